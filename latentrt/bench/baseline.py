"""The diffusers baseline on the very same weights, instrumented with the same per-stage timings as
latentrt's pipelines: each module's forward is timed under the name latentrt gives its engine
(:data:`STAGES`: text_encoder, text_encoder_2 for SDXL, prior_text_encoder and prior for unCLIP,
image_encoder for unCLIP variations, unet per step), and the VAE's ``decode`` / ``encode`` as
vae_decoder / vae_encoder (tiny_vae_decoder / tiny_vae_encoder with TAESD).

The pipeline class is the one the model folder declares (``model_index.json`` ``_class_name``):
``LatentConsistencyModelPipeline`` for SD1.5 LCM, ``StableDiffusionXLPipeline`` for the SDXL family
(LCM-SDXL UNets get diffusers' guidance embedding and no classifier-free guidance, as in latentrt),
and the classes of the other tasks of :mod:`.tasks` (the x2 latent upscaler, Stable unCLIP).

CPU: torch fp32 with ``torch.set_num_threads`` equal to latentrt's thread count. CUDA: fp16 with
PyTorch's SDPA attention (diffusers' default processor on torch 2), stages timed with CUDA events.
The same seed gives the same noise as latentrt (``TorchGeneratorNoise``), so images can be compared
(PSNR) as well as timed.
"""

from __future__ import annotations

import time
from pathlib import Path

from .tasks import DIFFUSERS_CLASSES as PIPELINE_CLASSES  # the classes the baseline runs, per task

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

#: the class of folders without a ``_class_name`` (the SD1.5 LCM baseline the harness started with)
DEFAULT_PIPELINE = "LatentConsistencyModelPipeline"
#: the pipeline attributes whose forward is timed, named as latentrt's pipelines name their engines
STAGES = ("text_encoder", "text_encoder_2", "prior_text_encoder", "prior", "image_encoder", "unet")


def pipeline_class_name(model_folder: str | Path) -> str:
    """The diffusers pipeline class a model folder declares, checked against :data:`PIPELINE_CLASSES`."""
    import json

    index = Path(model_folder) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name") or DEFAULT_PIPELINE
    except FileNotFoundError:
        raise ValueError(f"{model_folder}: not a diffusers model folder (no model_index.json)") from None
    except ValueError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"{index}: the diffusers baseline runs {list(PIPELINE_CLASSES)}, not {name!r}; "
                         "benchmark this model without a baseline (baselines = [], --no-baseline)")
    return name


def _accepted(cls, **kwargs) -> dict:
    """The keyword arguments ``cls.__init__`` takes (``from_pretrained`` warns about the others)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def quiet_loading() -> None:
    """No diffusers / transformers loading bars: the harness draws its own progress bar."""
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except (ImportError, AttributeError):  # pragma: no cover
        pass


class StageClock:
    """Per-stage durations of one call; CUDA events on a GPU (read after one synchronisation)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.stages: dict[str, list] = {}
        self.flops: dict[str, list[int]] = {}
        self.count_flops = False

    def wrap(self, stage: str, fn):
        import torch

        def timed(*args, **kwargs):
            if self.count_flops:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as fc:
                    out = fn(*args, **kwargs)
                self.flops.setdefault(stage, []).append(int(fc.get_total_flops()))
                return out
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.stages.setdefault(stage, []).append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.stages.setdefault(stage, []).append(time.perf_counter() - t0)
            return out

        return timed

    def reset(self) -> None:
        self.stages = {}

    def as_dict(self) -> dict[str, list[float]]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return {k: [s.elapsed_time(e) / 1000.0 for s, e in v] for k, v in self.stages.items()}
        return {k: list(v) for k, v in self.stages.items()}


class DiffusersBaseline:
    """The diffusers pipeline (:func:`pipeline_class_name`) of the folder a bundle was exported from."""

    system = "diffusers"

    def __init__(self, model_folder: str | Path, *, vae: str = "full", taesd=None, device: str = "cpu",
                 precision: str = "fp32", threads: int | None = None):
        import diffusers
        import torch
        from diffusers import AutoencoderTiny

        quiet_loading()
        if precision not in DTYPES:
            raise ValueError(f"baseline precision must be one of {sorted(DTYPES)}; got {precision!r}")
        cls = getattr(diffusers, pipeline_class_name(model_folder))
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if device in ("cuda", "tensorrt") else "cpu"
        dtype = getattr(torch, DTYPES[precision])
        # no safety checker (LCM) and no invisible watermark (SDXL): latentrt has neither
        kw = _accepted(cls, safety_checker=None, requires_safety_checker=False, add_watermarker=False)
        if vae == "tiny":
            if taesd is None:
                raise ValueError("the diffusers baseline with vae='tiny' needs the TAESD folder or hub id")
            kw["vae"] = AutoencoderTiny.from_pretrained(str(taesd), dtype=dtype).eval()
        # TAESD is passed in place of the folder's VAE (never loaded): quiet diffusers' "Expected types
        # for vae" warning about that
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            pipe = cls.from_pretrained(str(model_folder), dtype=dtype, **kw)
        finally:
            dlog.set_verbosity(level)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        prefix = "tiny_" if vae == "tiny" else ""
        self.vae_stage = prefix + "vae_decoder"
        self.clock = StageClock(self.device == "cuda")
        p = self.pipe
        modules = [(stage, getattr(p, stage, None)) for stage in STAGES]
        modules = [(stage, m) for stage, m in modules if m is not None]
        for stage, m in modules:
            m.forward = self.clock.wrap(stage, m.forward)
        p.vae.decode = self.clock.wrap(self.vae_stage, p.vae.decode)
        p.vae.encode = self.clock.wrap(prefix + "vae_encoder", p.vae.encode)  # the upscaler's image input
        self.weight_bytes = sum(t.numel() * t.element_size() for m in [*(m for _, m in modules), p.vae]
                                for t in [*m.parameters(), *m.buffers()])

    def __call__(self, *, prompt, seed, count_flops: bool = False, **pipe_kwargs):
        """One call with the task's keyword arguments (:func:`.tasks.pipe_kwargs`: steps, guidance, size,
        input image, ...); returns (images NHWC float in [0, 1], per-stage timings)."""
        import torch

        self.clock.reset()
        self.clock.count_flops = count_flops
        try:
            with torch.inference_mode():
                # prompt by keyword: StableUnCLIPImg2ImgPipeline takes the image first
                out = self.pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed),
                                **{**pipe_kwargs, "output_type": "np"})
        finally:
            self.clock.count_flops = False
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out.images, self.clock.as_dict()

    def flops(self) -> dict[str, int]:
        """FLOPs per call of each stage, as torch counted them in the ``count_flops`` call."""
        return {k: int(max(v)) for k, v in self.clock.flops.items() if v}

    def close(self) -> None:
        del self.pipe
