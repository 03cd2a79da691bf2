"""What every SD-family pipeline shares: engines, prompt encoding, image <-> latents, checks.

A pipeline subclass is composition only: encode text, prepare latents, loop, decode. Arrays are
numpy on the CPU path; arithmetic stays in float32 whatever the engines' precision (the engines
cast at their boundary).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..bundle import Bundle
from ..image import postprocess, to_nchw
from ..random import NoiseSource, randn
from ..schedulers import Scheduler, get_scheduler
from ..timing import StageTimer

logger = logging.getLogger("latentrt")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, NHWC float array in [0, 1], or latents (NCHW)
    timings: dict[str, list[float]] = field(default_factory=dict)
    nsfw_content_detected: Any = None

    def __iter__(self):  # `images, = pipe(...)` style unpacking, like return_dict=False in diffusers
        yield self.images


class BasePipeline:
    #: components the pipeline cannot run without / uses when present
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def __init__(self, bundle: Bundle, *, backend: str = "onnxruntime", device: str = "cpu", **engine_options):
        self.bundle = bundle
        self.backend = backend
        self.device = device
        missing = [c for c in self.required if not bundle.has(c)]
        if missing:
            raise ValueError(f"{bundle.path}: a {type(self).__name__} needs components {missing} that this bundle lacks")
        names = [c for c in (*self.required, *self.optional) if bundle.has(c)]
        self.engines = {c: bundle.engine(c, backend, device, **engine_options) for c in names}
        self._engine_options = dict(engine_options)  # for engines created later (the tiny VAE)
        self.vae_choice = "full"  # "full" | "tiny" (TAESD), chosen per call by select_vae
        self.tokenizer = bundle.tokenizer() if bundle.has("text_encoder") else None
        self.scheduler_config = bundle.scheduler_config()
        self.scheduler: Scheduler = get_scheduler(self.scheduler_config)
        self.constants = bundle.constants
        self.vae_scale_factor = int(self.constants.get("vae_scale_factor", 8))
        self.timer = StageTimer()
        self.last_timings: dict[str, list[float]] = {}

    # -- helpers -------------------------------------------------------------------------------
    def run(self, component: str, **inputs) -> dict[str, Any]:
        with self.timer(component):
            return self.engines[component](**inputs)

    def run_lazy(self, component: str, **inputs) -> dict[str, Any]:
        """:meth:`run`, creating the component's engine on first use (graphs that a call may not need:
        the ControlNets, the adapter, their UNet graphs, the tiny VAE)."""
        self.engine_for(component)
        return self.run(component, **inputs)

    def engine_for(self, component: str):
        if component not in self.engines:
            self.engines[component] = self.bundle.engine(component, self.backend, self.device, **self._engine_options)
        return self.engines[component]

    def run_on_device(self, component: str, **inputs) -> dict[str, Any]:
        """Call a component keeping its outputs on the device (engines with ``device_loop``); the
        stage is timed after the device finished it."""
        engine = self.engines[component]
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
        return get_scheduler(self.scheduler_config, scheduler)

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        h = height or int(self.constants["default_height"])
        w = width or int(self.constants["default_width"])
        m = int(self.constants.get("size_multiple", self.vae_scale_factor))
        for name, v in (("height", h), ("width", w)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
            if v % 8:
                raise ValueError(f"{name}={v} is not a multiple of 8; use {v - v % 8 or 8} or {v + 8 - v % 8}")
            if v % m:
                raise ValueError(
                    f"{name}={v} is not a multiple of {m}, which this bundle's UNet needs (its latents are "
                    f"downsampled {m // self.vae_scale_factor}x); use {v - v % m or m} or {v + m - v % m}"
                )
        return int(h), int(w)

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
                logger.warning("prompt truncated to %d CLIP tokens (it has %d): %r", limit, n, p)
        return ids

    def text_embeddings(self, prompts: Sequence[str], clip_skip: int | None = None) -> dict[str, np.ndarray]:
        """Run the text encoder; ``hidden`` is what the UNet's cross-attention gets."""
        out = self.run("text_encoder", input_ids=self.tokenize(prompts))
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
        return np.repeat(np.asarray(x, dtype=np.float32), n, axis=0)

    # -- latents <-> images -----------------------------------------------------------------------
    def is_latents(self, image: Any) -> bool:
        c = int(self.constants["latent_channels"])
        return (isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == c
                and image.shape[-1] > 4 and image.dtype.kind == "f")

    def encode_image(self, image: Any, batch_size: int, rng: NoiseSource, size=(None, None)) -> np.ndarray:
        """Image -> scaled latents for ``batch_size`` images, drawing as diffusers does
        (one latent-distribution sample per input image, then repeated to the batch). ``size``:
        (height, width) PIL images are resized to (each ``None``: the image's own)."""
        if self.is_latents(image):
            init = np.asarray(image, dtype=np.float32)
        elif self.vae_choice == "tiny":  # TAESD encodes to latents directly: no draw
            if not self.bundle.has("tiny_vae_encoder"):
                raise ValueError(f"{self.bundle.path}: image-to-image with vae='tiny' needs tiny_vae_encoder, which "
                                 "this bundle lacks; use vae='full' or re-export with --tiny-vae")
            pixels = to_nchw(image, vae_scale_factor=self.vae_scale_factor, height=size[0], width=size[1])
            init = np.asarray(self.run("tiny_vae_encoder", sample=pixels)["latents"], np.float32) * self.vae_scaling()
        else:
            pixels = to_nchw(image, vae_scale_factor=self.vae_scale_factor, height=size[0], width=size[1])
            params = self.run("vae_encoder", sample=pixels)["latent_parameters"]
            init = self.sample_latent_dist(np.asarray(params, np.float32), rng) * float(self.constants["vae_scaling_factor"])
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
        return self.start_noise(plan, shape, rng, latents)

    @staticmethod
    def start_noise(plan, shape: tuple, rng: NoiseSource, given=None, name: str = "latents") -> np.ndarray:
        """The start of a denoising loop: ``given`` (checked against ``shape``) or noise drawn from
        ``rng``, times the scheduler's ``init_noise_sigma``."""
        if given is None:
            x = randn(rng, shape)
        else:
            x = np.asarray(given, dtype=np.float32)
            if x.shape != shape:
                raise ValueError(f"{name} have shape {x.shape}; expected {shape} for this call")
        return x * np.float32(plan.init_noise_sigma)

    def noised_image_latents(self, sched, plan, image: Any, batch: int, rng: NoiseSource,
                             size=(None, None)) -> np.ndarray:
        """Image-to-image start: encode the image (checking its size suits the UNet) and noise it to
        the plan's first timestep, drawing as diffusers does (VAE sample, then the noise)."""
        init = self.encode_image(image, batch, rng, size)
        self.default_size(init.shape[2] * self.vae_scale_factor, init.shape[3] * self.vae_scale_factor)
        return sched.add_noise(plan, init, randn(rng, init.shape), 0)

    @staticmethod
    def sample_latent_dist(params: np.ndarray, rng: NoiseSource) -> np.ndarray:
        """diffusers' DiagonalGaussianDistribution(parameters).sample()."""
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        return mean + std * randn(rng, mean.shape)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        decoder = self.VAE_COMPONENTS[self.vae_choice][0]
        return np.asarray(self.run(decoder, latent_sample=latents / self.vae_scaling())["sample"], dtype=np.float32)

    @staticmethod
    def check_output_type(output_type: str) -> None:
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent'; got {output_type!r}")

    def finish(self, latents: np.ndarray, output_type: str) -> PipelineOutput:
        self.check_output_type(output_type)
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return PipelineOutput(images=images, timings=self.timer.as_dict())

    def start_call(self) -> None:
        self.timer = StageTimer()
        self.vae_choice = "full"

    #: per VAE choice: (decoder, encoder) component names
    VAE_COMPONENTS = {"full": ("vae_decoder", "vae_encoder"), "tiny": ("tiny_vae_decoder", "tiny_vae_encoder")}

    def select_vae(self, vae: str | None) -> None:
        """Use the full VAE (``"full"``, default) or the bundle's TAESD (``"tiny"``) for this call's
        ``decode`` / ``encode_image``. Tiny engines are created on first use, so bundles that carry
        TAESD cost nothing extra when it is not used."""
        vae = vae or "full"
        if vae not in self.VAE_COMPONENTS:
            raise ValueError(f"vae must be 'full' or 'tiny'; got {vae!r}")
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
