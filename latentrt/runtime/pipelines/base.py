"""What every SD-family pipeline shares: engines, prompt encoding, image <-> latents, checks.

A pipeline subclass is composition only: encode text, prepare latents, loop, decode. Arrays are
numpy on the CPU path; arithmetic stays in float32 whatever the engines' precision (the engines
cast at their boundary).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ...manifest import REEXPORT_HINT, BundleError
from ...sizes import MAX_SIZE_HINT, SizeRange
from ...spec import SpecError
from .. import limits, safety
from ..arguments import check_arguments
from ..bundle import Bundle
from ..image import postprocess, to_nchw
from ..random import NoiseSource, randn
from ..schedulers import Scheduler, get_scheduler, undecidable_keys
from ..timing import StageTimer
from .freeu import FreeUOption
from .lora_scales import LoraScales
from .vae_options import VaeTiling

logger = logging.getLogger("latentrt")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, NHWC float array in [0, 1], or latents (NCHW)
    timings: dict[str, list[float]] = field(default_factory=dict)
    nsfw_content_detected: Any = None

    def __iter__(self):  # `images, = pipe(...)` style unpacking, like return_dict=False in diffusers
        yield self.images


class CallState(threading.local):
    """What one pipeline call owns: its stage timer and VAE choice (and the timings of the thread's
    last call). Each thread sees its own, so one pipeline object serves concurrent calls (the
    server's worker threads) without mixing their timings or VAEs."""

    def __init__(self):
        self.timer = StageTimer()
        self.vae_choice = "full"  # "full" | "tiny" (TAESD), chosen per call by select_vae
        self.vae_options = None  # VaeOptions of this call (None: the pipeline's defaults), see vae_options.py
        self.last_timings: dict[str, list[float]] = {}
        self.freeu = None  # (s1, s2, b1, b2) of this call or None (see freeu.py)


def _call_attribute(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._call, name), lambda self, v: setattr(self._call, name, v), doc=doc)


def _create_engines(bundle: Bundle, names: list[str], backend: str, device: str, options: dict) -> dict:
    """Every named component's engine. On the CPU backends they are created in parallel threads (their
    compilers release the GIL), so a new process waits for the slowest component (the UNet), not the sum;
    elsewhere (GPU contexts, the torch backend) one after the other."""
    if backend not in ("onnxruntime", "openvino") or device != "cpu" or len(names) < 2:
        return {c: bundle.engine(c, backend, device, **options) for c in names}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="latentrt-load") as pool:
        futures = {c: pool.submit(bundle.engine, c, backend, device, **options) for c in names}
        return {c: f.result() for c, f in futures.items()}  # the first failure is raised, named as the engine names it


class BasePipeline(LoraScales, VaeTiling, FreeUOption):
    #: components the pipeline cannot run without / uses when present
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    #: present components whose engines are created on first use, not at load: a text-to-image
    #: process never compiles (or holds) the VAE encoder that only image inputs need
    deferred: tuple[str, ...] = ("vae_encoder",)

    def __init_subclass__(cls, **kw):
        """Each pipeline's ``__call__`` first checks the arguments all pipelines share (:mod:`..arguments`)."""
        super().__init_subclass__(**kw)
        call = cls.__dict__.get("__call__")
        if call is not None:
            import functools
            import inspect

            signature = inspect.signature(call)

            @functools.wraps(call)
            def checked(self, *args, **kwargs):
                arguments = dict(list(signature.bind(self, *args, **kwargs).arguments.items())[1:])
                check_arguments(arguments, per_image_guidance=getattr(self, "per_image_guidance", False))
                if "safety_checker" in signature.parameters:  # before any engine runs (runtime/safety.py)
                    safety.check_request(self, arguments.get("safety_checker"))
                return call(self, *args, **kwargs)

            cls.__call__ = checked

    def __init__(self, bundle: Bundle, *, backend: str = "onnxruntime", device: str = "cpu", **engine_options):
        self.bundle = bundle
        self.backend = backend
        self.device = device
        missing = [c for c in self.required if not bundle.has(c)]
        if missing:
            raise ValueError(f"{bundle.path}: a {type(self).__name__} needs components {missing} that this bundle lacks")
        names = [c for c in (*self.required, *self.optional) if bundle.has(c) and c not in self.deferred]
        self.engines = _create_engines(bundle, names, backend, device, engine_options)
        self._engine_options = dict(engine_options)  # for engines created later (the tiny VAE)
        self._engines_lock = threading.Lock()
        self._call = CallState()
        self.tokenizer = bundle.tokenizer() if bundle.has("text_encoder") else None
        self.scheduler_config = bundle.scheduler_config()
        self.scheduler: Scheduler = get_scheduler(self.scheduler_config)
        self.constants = bundle.constants
        self.vae_scale_factor = int(self.constants.get("vae_scale_factor", 8))

    # per-call state (see CallState): attributes of the calling thread's call, not of the object
    timer = _call_attribute("timer", "the running call's StageTimer")
    vae_choice = _call_attribute("vae_choice", "the running call's VAE: 'full' or 'tiny'")
    last_timings = _call_attribute("last_timings", "stage timings of this thread's last finished call")

    # -- helpers -------------------------------------------------------------------------------
    def run(self, component: str, **inputs) -> dict[str, Any]:
        if component not in self.engines and component in self.deferred:  # direct run / run_vae callers
            self.engine_for(component)
        inputs = self.freeu_inputs(component, self.engines[component].inputs, inputs)  # freeu.py
        self.check_memory(limits.call_sizes(self.engines[component].inputs, inputs), [component])
        with self.timer(component):
            return self.engines[component](**inputs)

    def check_memory(self, sizes: dict | None, components=None) -> None:
        """Refuse a call that cannot fit in the memory available before an engine runs (:mod:`..limits`;
        host memory, so CPU devices only)."""
        if self.device != "cpu":
            return
        limits.check_engines(self.engines, self.bundle.manifest, sizes, components,
                             size_multiple=int(self.constants.get("size_multiple", self.vae_scale_factor)))

    def run_lazy(self, component: str, **inputs) -> dict[str, Any]:
        """:meth:`run`, creating the component's engine on first use (graphs that a call may not need:
        the ControlNets, the adapter, their UNet graphs, the tiny VAE)."""
        self.engine_for(component)
        return self.run(component, **inputs)

    def engine_for(self, component: str):
        with self._engines_lock:  # concurrent first calls create each engine once
            if component not in self.engines:
                self.engines[component] = self.bundle.engine(component, self.backend, self.device,
                                                             **self._engine_options)
            return self.engines[component]

    def load_deferred(self) -> None:
        """Create the engines :attr:`deferred` to first use now (a server's warm-up: its first image
        request should not wait for them)."""
        for c in self.deferred:
            if self.bundle.has(c):
                self.engine_for(c)

    def run_on_device(self, component: str, **inputs) -> dict[str, Any]:
        """Call a component keeping its outputs on the device (engines with ``device_loop``); the
        stage is timed after the device finished it."""
        engine = self.engines[component]
        inputs = self.freeu_inputs(component, engine.inputs, inputs)  # freeu.py
        self.check_memory(limits.call_sizes(engine.inputs, inputs), [component])
        with self.timer(component):
            out = engine.call_on_device(**inputs)
            engine.synchronize()
        return out

    def get_scheduler(self, scheduler: str | Scheduler | None) -> Scheduler:
        """The bundle's scheduler, or another diffusers class name built from the bundle's config."""
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, Scheduler):
            return scheduler
        if not self.bundle.scheduler_configs_as_published:
            self._refuse_undecidable_swap(scheduler)
        return get_scheduler(self.scheduler_config, scheduler)

    def _refuse_undecidable_swap(self, name: str) -> None:
        """An old bundle's config has every key written out; a swap whose result depends on whether
        the published file set a key (diffusers gives unset keys the target's defaults) is refused."""
        doubt = undecidable_keys(self.scheduler_config, name)
        if doubt:
            keys = "; ".join(f"{k}: {a!r} if the source's file set it, {b!r} if it left it out"
                             for k, (a, b) in doubt.items())
            raise BundleError(
                f"{self.bundle.path}: this bundle was exported before latentrt kept scheduler configs as "
                f"published, so scheduler={name!r} is ambiguous ({keys}); {REEXPORT_HINT} (or pass "
                f"scheduler=latentrt.runtime.schedulers.get_scheduler(config, {name!r}) with the config you mean)"
            )

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The call's (height, width): given, or the bundle's default; refused (before any engine runs)
        outside the sizes the bundle supports (:mod:`latentrt.sizes`) or its engines' profile ranges."""
        h = height or int(self.constants["default_height"])
        w = width or int(self.constants["default_width"])
        self.check_image_size(h, w)
        return int(h), int(w)

    @property
    def size_range(self) -> SizeRange:
        return SizeRange.from_constants(self.constants, self.vae_scale_factor)

    def check_image_size(self, height, width) -> None:
        """Sides in the bundle's size range, then in every engine's profile range (TensorRT)."""
        r = self.size_range
        for name, v in (("height", height), ("width", width)):
            problem = r.problem(name, v, fix_max=MAX_SIZE_HINT)
            if problem:
                raise ValueError(problem)
        self.check_engine_limits(int(height), int(width))

    def check_engine_limits(self, height: int, width: int, *, unit: str = "px", where: str = "") -> None:
        """Refuse sizes outside an engine's profile range (engines built for a shape profile carry the
        ranges of the spec symbols ``H`` / ``W``) before any engine runs."""
        for component, engine in self.engines.items():
            for sym, v in (("H", height), ("W", width)):
                lo, hi = getattr(engine, "limits", {}).get(sym, (v, v))
                if not lo <= v <= hi:
                    near = " or ".join(map(str, SizeRange(self.size_range.multiple, lo, hi).nearest(v)))
                    raise SpecError(f"{where}{sym}={v} is outside the {component} engine's profile range [{lo}, {hi}] "
                                    f"({unit}); use {near}, or rebuild the engines with a profile that covers it "
                                    "(latentrt build --profile ...)")

    def check_batch(self, images: int) -> None:
        """At most the bundle's ``max_batch`` images per call (checked before any engine runs)."""
        problem = self.size_range.batch_problem(int(images))
        if problem:
            raise ValueError(problem)

    @staticmethod
    def prompt_list(prompt, prompt_embeds) -> tuple[list[str] | None, int]:
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass a prompt (str or list of str) or prompt_embeds")
        if prompt is None:
            pe = np.asarray(prompt_embeds)
            if pe.ndim != 3:
                raise ValueError(f"prompt_embeds must have shape (batch, seq_len, dim); got {pe.shape}")
            return None, pe.shape[0]
        if isinstance(prompt, str):
            return [prompt], 1
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt), len(prompt)
        raise TypeError(f"prompt must be a str or a non-empty list of str; got {type(prompt).__name__}")

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(prompts))
        lengths = self.tokenizer.untruncated_length(list(prompts))
        limit = self.tokenizer.model_max_length
        for p, n in zip(prompts, lengths):
            if n > limit:
                logger.warning("prompt truncated to %d CLIP tokens (it has %d): %r", limit, n,
                               p if len(p) <= 200 else p[:200] + "...")
        return ids

    def text_embeddings(self, prompts: Sequence[str], clip_skip: int | None = None) -> dict[str, np.ndarray]:
        """Run the text encoder; ``hidden`` is what the UNet's cross-attention gets."""
        out = self.run("text_encoder", input_ids=self.tokenize(prompts), **self.lora_inputs("text_encoder"))
        if clip_skip is None:
            hidden = out["last_hidden_state"]
        else:
            stack = out["normed_hidden_states"]
            if not 0 <= clip_skip < stack.shape[0] - 1:
                raise ValueError(f"clip_skip must be in [0, {stack.shape[0] - 2}] for this text encoder; got {clip_skip}")
            hidden = stack[-(clip_skip + 1)]
        return {"hidden": np.asarray(hidden, dtype=np.float32), "pooled": np.asarray(out["pooler_output"], np.float32)}

    @staticmethod
    def repeat_per_prompt(x: np.ndarray, n: int) -> np.ndarray:
        """[p0, p1] -> [p0, p0, p1, p1] for n=2 (diffusers' repeat + view)."""
        limits.check_allocation((np.shape(x)[0] * n, *np.shape(x)[1:]), "the per-image prompt embeddings")
        return np.repeat(np.asarray(x, dtype=np.float32), n, axis=0)

    # -- latents <-> images -----------------------------------------------------------------------
    def is_latents(self, image: Any) -> bool:
        c = int(self.constants["latent_channels"])
        return (isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == c
                and image.shape[-1] > 4 and image.dtype.kind == "f")

    def encode_image(self, image: Any, batch_size: int, rng: NoiseSource, size=(None, None)) -> np.ndarray:
        """Image -> scaled latents for ``batch_size`` images, drawing as diffusers does
        (one latent-distribution sample per input image, then repeated to the batch). ``size``:
        (height, width) PIL images are resized to (each ``None``: the image's own). The size is
        checked (:meth:`check_image_size`) before the VAE encoder runs."""
        f = self.vae_scale_factor
        if self.is_latents(image):
            init = np.asarray(image, dtype=np.float32)
            self.check_image_size(init.shape[2] * f, init.shape[3] * f)
        elif self.vae_choice == "tiny":  # TAESD encodes to latents directly: no draw
            if not self.bundle.has("tiny_vae_encoder"):
                raise ValueError(f"{self.bundle.path}: image-to-image with vae='tiny' needs tiny_vae_encoder, which "
                                 "this bundle lacks; use vae='full' or re-export with --tiny-vae")
            pixels = to_nchw(image, vae_scale_factor=f, height=size[0], width=size[1])
            self.check_image_size(pixels.shape[2], pixels.shape[3])
            init = np.asarray(self.run_vae("tiny_vae_encoder", pixels, "encode", "sample", "latents"),
                              np.float32) * self.vae_scaling()
        else:
            self.engine_for("vae_encoder")  # deferred to this first use; its profile range is checked next
            pixels = to_nchw(image, vae_scale_factor=f, height=size[0], width=size[1])
            self.check_image_size(pixels.shape[2], pixels.shape[3])
            params = np.asarray(self.run_vae("vae_encoder", pixels, "encode", "sample", "latent_parameters"), np.float32)
            init = self.sample_latent_dist(params, rng) * float(self.constants["vae_scaling_factor"])
        n = init.shape[0]
        if batch_size % n:
            raise ValueError(f"cannot repeat {n} input images to a batch of {batch_size}; pass 1 or {batch_size} images")
        return np.concatenate([init] * (batch_size // n), axis=0) if batch_size > n else init

    def initial_latents(self, plan, batch: int, height: int, width: int, rng: NoiseSource,
                        latents: np.ndarray | None = None) -> np.ndarray:
        """Text-to-image start (diffusers' ``prepare_latents``): given or drawn noise, times the
        scheduler's ``init_noise_sigma``."""
        f = self.vae_scale_factor
        shape = (batch, int(self.constants["unet_in_channels"]), height // f, width // f)
        self.check_memory({"B": batch, "H": height, "W": width})  # before drawing noise or running the UNet
        return self.start_noise(plan, shape, rng, latents)

    @staticmethod
    def start_noise(plan, shape: tuple, rng: NoiseSource, given=None, name: str = "latents") -> np.ndarray:
        """The start of a denoising loop: ``given`` (checked against ``shape``) or noise drawn from
        ``rng``, times the scheduler's ``init_noise_sigma``."""
        if given is None:
            limits.check_allocation(shape, f"the initial {name}")
            x = randn(rng, shape)
        else:
            x = np.asarray(given, dtype=np.float32)
            if x.shape != shape:
                raise ValueError(f"{name} have shape {x.shape}; expected {shape} for this call")
        return x * np.float32(plan.init_noise_sigma)

    def noised_image_latents(self, sched, plan, image: Any, batch: int, rng: NoiseSource,
                             size=(None, None)) -> np.ndarray:
        """Image-to-image start: encode the image (:meth:`encode_image` checks its size first) and noise
        it to the plan's first timestep, drawing as diffusers does (VAE sample, then the noise)."""
        init = self.encode_image(image, batch, rng, size)
        return sched.add_noise(plan, init, randn(rng, init.shape), 0)

    @staticmethod
    def sample_latent_dist(params: np.ndarray, rng: NoiseSource) -> np.ndarray:
        """diffusers' DiagonalGaussianDistribution(parameters).sample()."""
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        return mean + std * randn(rng, mean.shape)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        decoder = self.VAE_COMPONENTS[self.vae_choice][0]
        return self.run_vae(decoder, latents / self.vae_scaling(), "decode", "latent_sample", "sample")

    @staticmethod
    def check_output_type(output_type: str) -> None:
        if not isinstance(output_type, str) or output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent'; got {output_type!r}")

    def finish(self, latents: np.ndarray, output_type: str, safety_checker: bool | None = False) -> PipelineOutput:
        """Decode and postprocess; ``safety_checker``: the call's (None: the bundle's checker if it has
        one), which sets ``nsfw_content_detected`` and blacks out flagged images (runtime/safety.py)."""
        self.check_output_type(output_type)
        if not np.isfinite(np.asarray(latents)).all():
            raise ValueError("the denoised latents are not finite (NaN or inf): the guidance scale, eta or the given "
                             "latents / embeddings are too large for this model, or an fp16 component overflowed")
        if output_type == "latent":
            return PipelineOutput(images=latents, timings=self.timer.as_dict())
        decoded = self.decode(latents)
        images, nsfw = safety.run_checker(self, decoded, postprocess(decoded, output_type), output_type, safety_checker)
        return PipelineOutput(images=images, timings=self.timer.as_dict(), nsfw_content_detected=nsfw)

    def start_call(self) -> None:
        self.timer = StageTimer()
        self.vae_choice = "full"
        self.set_vae_options()  # the pipeline's VAE tiling / slicing defaults (select_vae may override them)
        self.set_freeu()  # the pipeline's FreeU default (a call's freeu= overrides it)

    #: per VAE choice: (decoder, encoder) component names
    VAE_COMPONENTS = {"full": ("vae_decoder", "vae_encoder"), "tiny": ("tiny_vae_decoder", "tiny_vae_encoder")}

    def select_vae(self, vae: str | None, tiling: bool | None = None, slicing: bool | None = None) -> None:
        """Use the full VAE (``"full"``, default) or the bundle's TAESD (``"tiny"``) for this call's
        ``decode`` / ``encode_image``. Tiny engines are created on first use, so bundles that carry
        TAESD cost nothing extra when it is not used. ``tiling`` / ``slicing``: the call's
        ``vae_tiling`` / ``vae_slicing`` (None: the pipeline's default, see :mod:`.vae_options`)."""
        vae = "full" if vae is None else vae
        if not isinstance(vae, str) or vae not in self.VAE_COMPONENTS:
            raise ValueError(f"vae must be 'full' or 'tiny'; got {vae!r}")
        self.set_vae_options(tiling, slicing, vae)
        if vae == "tiny":
            if not self.bundle.has("tiny_vae_decoder"):
                raise ValueError(f"{self.bundle.path}: vae='tiny' needs a tiny VAE (TAESD), which this bundle lacks; "
                                 "re-export it with `latentrt export SRC -o BUNDLE --tiny-vae madebyollin/taesd`")
            for c in self.VAE_COMPONENTS["tiny"]:
                if self.bundle.has(c):
                    self.engine_for(c)
        self.vae_choice = vae

    def vae_scaling(self) -> float:
        key = "tiny_vae_scaling_factor" if self.vae_choice == "tiny" else "vae_scaling_factor"
        return float(self.constants[key])

    def end_call(self, out: PipelineOutput) -> PipelineOutput:
        self.last_timings = out.timings = self.timer.as_dict()
        return out

    @staticmethod
    def call_callbacks(pipe, i: int, t, tensors: dict, callback_on_step_end: Callable | None,
                       callback: Callable | None) -> dict:
        """diffusers' ``callback_on_step_end(pipe, i, t, kwargs) -> dict`` (may replace latents) and the
        simple ``callback(i, t, latents)``."""
        if callback_on_step_end is not None:
            updates = callback_on_step_end(pipe, i, t, dict(tensors)) or {}
            tensors = {**tensors, **{k: v for k, v in updates.items() if k in tensors}}
        if callback is not None:
            callback(i, t, tensors["latents"])
        return tensors
