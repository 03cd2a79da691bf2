"""The latent x2 upscaler (diffusers' ``StableDiffusionLatentUpscalePipeline``) and chaining.

The loop, as diffusers runs it: Euler discrete sigmas; the UNet gets the scaled noisy latents
concatenated with the nearest-upsampled low-res latents, ``timestep = log(sigma) / 4`` and
``timestep_cond = [ones(64), zeros(64), text pooler output]``; its last output channel (a variance)
is dropped and Karras et al.'s preconditioning turns the rest into a denoised sample
(``x / (sigma^2 + 1) + out * sigma / sqrt(sigma^2 + 1)``), which the scheduler (``prediction_type``
"sample") steps with. Classifier-free guidance doubles the batch (``guidance_scale > 1``);
``guidance_scale == 0`` encodes empty prompts instead of the prompt.

The input is SD latents (float NCHW with the VAE's 4 channels, e.g. what an LCM or SD pipeline
returns with ``output_type="latent"``, so nothing is decoded and encoded again in between) or an
image (PIL, numpy, lists of them: encoded by the VAE encoder, one latent-distribution draw). As
everywhere in latentrt (:func:`~latentrt.runtime.image.to_nchw`), HWC/NHWC images are in [0, 1] (or
uint8) and 3-channel NCHW arrays are taken as already in [-1, 1].

Sizes: the bundle's ``size_multiple`` / ``min_size`` / ``max_size`` constants are *input* pixels;
the output is twice as large on each side.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from ..image import ImageInputError, to_nchw
from ..random import as_noise_source, randn
from ..schedulers.base import f32, log32
from .base import BasePipeline, PipelineOutput
from .guidance import apply_guidance, do_classifier_free_guidance, negative_prompt_list

#: outputs with more pixels than this are decoded with VAE tiling unless the call sets vae_tiling (an
#: untiled SD VAE decode of 2048x2048 needs many GiB: its mid-block attention alone is 65536 x 65536)
AUTO_TILING_PIXELS = 1024 * 1024

logger = logging.getLogger("latentrt")


def _tensor_to_numpy(x: Any) -> Any:
    """torch tensors (duck-typed: the runtime never imports torch) -> float32 numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        return x.detach().cpu().float().numpy()
    return x


def nearest_upsample2x(x: np.ndarray) -> np.ndarray:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` for NCHW arrays."""
    return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)


def karras_precondition(model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
    """Karras et al. (2022), table 1, as the diffusers pipeline applies it: ``c_skip * x + c_out * F``
    with ``c_skip = 1 / (sigma^2 + 1)`` and ``c_out = sigma / sqrt(sigma^2 + 1)`` (float32)."""
    s2 = sigma * sigma + f32(1)
    c_skip = f32(1) / s2
    c_out = sigma / np.sqrt(s2)
    return sample * c_skip + model_output * c_out


class LatentUpscalePipeline(BasePipeline):
    required = ("text_encoder", "unet", "vae_decoder")
    optional = ("vae_encoder",)

    @property
    def latent_channels(self) -> int:
        return int(self.constants["latent_channels"])

    # -- inputs --------------------------------------------------------------------------------
    def classify_input(self, image: Any) -> tuple[str, Any]:
        """("latents", float32 NCHW array) or ("image", what :func:`to_nchw` takes).

        Latents are a float array of rank 4 with the VAE's latent channels on axis 1 (and a width
        above 4, so that an NHWC RGBA image is never mistaken for them); torch tensors are accepted
        and converted. Images are anything :func:`to_nchw` takes.
        """
        if image is None:
            raise ValueError("pass image=: SD latents (batch, 4, h, w) or an image (PIL, numpy, or a list of them)")
        if isinstance(image, (list, tuple)):
            items = [_tensor_to_numpy(i) for i in image]
            if items and all(isinstance(i, np.ndarray) and self._looks_like_latents(i) for i in items):
                for i in items:
                    self._check_latent_rank(i)
                return "latents", np.concatenate([i.astype(np.float32) for i in items], axis=0)
            return "image", items
        image = _tensor_to_numpy(image)
        if not isinstance(image, np.ndarray):
            return "image", image
        if self._looks_like_latents(image):
            self._check_latent_rank(image)
            return "latents", image.astype(np.float32)
        if image.ndim == 4 and image.shape[-1] not in (1, 3, 4) and image.shape[1] not in (3, self.latent_channels):
            raise ImageInputError(
                f"image has {image.shape[1]} channels (shape {image.shape}, read as NCHW); pass an RGB image "
                f"(3 channels) or SD latents ({self.latent_channels} channels, shape (batch, "
                f"{self.latent_channels}, h, w))")
        return "image", image

    def _looks_like_latents(self, a: np.ndarray) -> bool:
        return a.dtype.kind == "f" and a.ndim >= 3 and a.shape[-3] == self.latent_channels and a.shape[-1] > 4

    def _check_latent_rank(self, a: np.ndarray) -> None:
        if a.ndim != 4:
            hint = "; add the batch axis with latents[None]" if a.ndim == 3 else ""
            raise ValueError(f"latents must have rank 4 (batch, {self.latent_channels}, h, w); got shape "
                             f"{a.shape} (rank {a.ndim}){hint}")

    def check_size(self, latent_h: int, latent_w: int) -> None:
        """Input latents -> the bundle's size limits (``size_multiple``, ``min_size``, ``max_size``:
        input pixels; the UNet runs at twice the latent size)."""
        f = self.vae_scale_factor
        k = self.constants
        h, w = latent_h * f, latent_w * f
        m, lo, hi = int(k["size_multiple"]), int(k["min_size"]), int(k["max_size"])
        up = int(k.get("upscale_factor", 2))
        where = f"input {h}x{w} px (HxW; latents {latent_h}x{latent_w})"
        if h > hi or w > hi:
            raise ValueError(
                f"{where} would be upscaled to {up * h}x{up * w} px, beyond this bundle's limit: input sides at "
                f"most max_size={hi} px (output {up * hi} px); downscale the input or re-export the upscaler "
                f"with a larger max_size")
        if h < lo or w < lo:
            raise ValueError(f"{where} is below this bundle's min_size={lo} px per side (the UNet's "
                             f"downsampling needs it); use a larger input")
        if h % m or w % m:
            raise ValueError(f"{where}: sides must be multiples of size_multiple={m} px (latents: multiples of "
                             f"{m // f}) for the UNet's downsampling; crop or resize to "
                             f"{h - h % m or m}x{w - w % m or m}")
        # engines built for a shape profile (TensorRT) carry ranges of the same symbols (input pixels)
        self.check_engine_limits(h, w, unit="input pixels", where=f"{where}: ")

    def low_res_latents(self, kind: str, value: Any, batch_size: int, rng) -> np.ndarray:
        """The latents to upscale, one per prompt: given, or encoded from the image (one draw)."""
        if kind == "latents":
            low = value
        else:
            if not self.bundle.has("vae_encoder"):
                raise ValueError(f"{self.bundle.path}: upscaling an image needs a vae_encoder, which this bundle "
                                 "lacks; pass latents instead")
            self.engine_for("vae_encoder")  # deferred to this first use; its profile range is checked next
            pixels = to_nchw(value, vae_scale_factor=self.vae_scale_factor)
            self.check_size(pixels.shape[2] // self.vae_scale_factor, pixels.shape[3] // self.vae_scale_factor)
            params = self.run_vae("vae_encoder", pixels, "encode", "sample", "latent_parameters")
            low = self.sample_latent_dist(params, rng) * np.float32(self.constants["vae_scaling_factor"])
        self.check_size(low.shape[2], low.shape[3])
        n = low.shape[0]
        if n != batch_size:
            if n != 1:
                raise ValueError(f"{n} input images/latents for {batch_size} prompts; pass one per prompt, or one "
                                 "for all")
            low = np.concatenate([low] * batch_size, axis=0)
        return low

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hidden states before the final layer norm, pooler output), as the upscaler uses them.
        Copied: with CFG the next call of the same engine may reuse its output buffers."""
        out = self.run("text_encoder", input_ids=self.tokenize(prompts))
        return (np.array(out["last_hidden_state_prenorm"], np.float32),
                np.array(out["pooler_output"], np.float32))

    @staticmethod
    def _embeds_pair(hidden, pooled, what: str) -> tuple[np.ndarray, np.ndarray]:
        if pooled is None:
            raise ValueError(f"{what}_embeds need {'negative_' if what == 'negative_prompt' else ''}"
                             f"pooled_prompt_embeds too (the text encoder's pooler output, shape (batch, dim))")
        hidden = np.asarray(_tensor_to_numpy(hidden), np.float32)
        pooled = np.asarray(_tensor_to_numpy(pooled), np.float32)
        if hidden.ndim != 3 or pooled.ndim != 2 or hidden.shape[0] != pooled.shape[0]:
            raise ValueError(f"{what}_embeds must have shape (batch, seq_len, dim) and their pooled embeds "
                             f"(batch, dim); got {hidden.shape} and {pooled.shape}")
        return hidden, pooled

    def conditioning(self, prompt, negative_prompt, guidance_scale, prompt_embeds=None, pooled_prompt_embeds=None,
                     negative_prompt_embeds=None, negative_pooled_prompt_embeds=None):
        """(encoder_hidden_states, pooled) for the UNet, [negative..., positive...] under CFG.

        diffusers' rules: ``guidance_scale == 0`` encodes empty prompts (given embeds are kept);
        CFG (``guidance_scale > 1``) encodes ``negative_prompt`` (default "") per prompt, in a second
        text-encoder call of the prompt batch.
        """
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            hidden, pooled = self._embeds_pair(prompt_embeds, pooled_prompt_embeds, "prompt")
            prompts = [""] * hidden.shape[0]
        else:
            prompts, batch = self.prompt_list(prompt, None)
            if guidance_scale == 0:  # diffusers: unconditional upscaling
                prompts = [""] * batch
            hidden, pooled = self.encode_text(prompts)
        if not do_classifier_free_guidance(guidance_scale):
            if negative_prompt is not None or negative_prompt_embeds is not None:
                logger.warning("negative prompts have no effect with guidance_scale <= 1")
            return hidden, pooled
        if negative_prompt_embeds is not None:
            if negative_prompt is not None:
                raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
            neg_hidden, neg_pooled = self._embeds_pair(negative_prompt_embeds, negative_pooled_prompt_embeds,
                                                       "negative_prompt")
            if neg_hidden.shape != hidden.shape:
                raise ValueError(f"negative_prompt_embeds have shape {neg_hidden.shape} but prompt_embeds "
                                 f"{hidden.shape}; they must match")
        else:
            neg_hidden, neg_pooled = self.encode_text(negative_prompt_list(negative_prompt, len(prompts)))
        return np.concatenate([neg_hidden, hidden], axis=0), np.concatenate([neg_pooled, pooled], axis=0)

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                      do_classifier_free_guidance: bool = True):
        """diffusers' ``encode_prompt`` of the latent upscaler: ``(prompt_embeds, negative_prompt_embeds,
        pooled_prompt_embeds, negative_pooled_prompt_embeds)`` for the call arguments of the same names
        (the negatives ``None`` without classifier-free guidance). The upscaler has no
        ``num_images_per_prompt`` or ``clip_skip``."""
        if prompt is None:
            raise ValueError("encode_prompt needs a prompt (str or list of str)")
        cfg = bool(do_classifier_free_guidance)
        hidden, pooled = self.conditioning(prompt, negative_prompt if cfg else None, 2.0 if cfg else 1.0)
        if not cfg:
            return hidden, None, pooled, None
        half = hidden.shape[0] // 2
        return hidden[half:], hidden[:half], pooled[half:], pooled[:half]

    # -- the call -------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        *,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        negative_prompt: str | list[str] | None = None,
        generator: Any = None,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        scheduler: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback: Callable | None = None,
        prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        vae_tiling: bool | None = None,
        vae_slicing: bool | None = None,
    ) -> PipelineOutput:
        """Upscale ``image`` (SD latents or an image) 2x, guided by ``prompt`` (diffusers' defaults:
        75 steps, guidance 9). ``latents`` is the initial noise at the output size, as in diffusers.
        ``prompt_embeds`` (the text encoder's last hidden state *before* its final layer norm) come
        with ``pooled_prompt_embeds``; the same for the negative pair. Outputs above
        ``AUTO_TILING_PIXELS`` (1024 x 1024) are decoded with VAE tiling unless ``vae_tiling`` says otherwise."""
        self.start_call()
        self.set_vae_options(vae_tiling, vae_slicing)
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent'; got {output_type!r}")
        kind, value = self.classify_input(image)
        if prompt is None and prompt_embeds is None:  # unprompted upscaling: one empty prompt per input
            prompt = [""] * (value.shape[0] if kind == "latents" else len(to_nchw(value, vae_scale_factor=1)))
        do_cfg = do_classifier_free_guidance(guidance_scale)
        hidden, pooled = self.conditioning(prompt, negative_prompt, guidance_scale, prompt_embeds,
                                           pooled_prompt_embeds, negative_prompt_embeds,
                                           negative_pooled_prompt_embeds)
        batch = hidden.shape[0] // (2 if do_cfg else 1)
        self.check_batch(batch)
        sched = self.get_scheduler(scheduler)
        plan = sched.plan(num_inference_steps)
        rng = as_noise_source(generator)

        low = self.low_res_latents(kind, value, batch, rng)
        mult = 2 if do_cfg else 1
        inv_noise_level = np.float32((float(self.constants.get("noise_level", 0.0)) ** 2 + 1) ** -0.5)
        image_cond = nearest_upsample2x(np.concatenate([low] * mult, axis=0)) * inv_noise_level
        n = pooled.shape[0]
        half = int(self.constants.get("noise_level_embed_dim", 128)) // 2
        noise_level_embed = np.concatenate([np.ones((n, half), np.float32), np.zeros((n, half), np.float32)], axis=1)
        timestep_cond = np.concatenate([noise_level_embed, pooled], axis=1)

        shape = (batch, self.latent_channels, 2 * low.shape[2], 2 * low.shape[3])
        if latents is None:
            latents = randn(rng, shape)
        else:
            latents = np.asarray(_tensor_to_numpy(latents), dtype=np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents (the initial noise) have shape {latents.shape}; expected {shape}")
        latents = latents * np.float32(plan.init_noise_sigma)
        f = self.vae_scale_factor
        self.tile_above(shape[2] * f * shape[3] * f, AUTO_TILING_PIXELS, vae_tiling, vae_slicing)
        latents = self.denoise(sched, plan, latents, image_cond, hidden, timestep_cond, guidance_scale if do_cfg
                               else None, rng, callback_on_step_end, callback)
        return self.end_call(self.finish(latents, output_type))

    def denoise(self, sched, plan, latents, image_cond, hidden, timestep_cond, guidance_scale, rng,
                callback_on_step_end=None, callback=None) -> np.ndarray:
        """The Euler loop with Karras preconditioning; ``guidance_scale`` None means no CFG."""
        state = sched.init_state(plan)
        n = image_cond.shape[0]
        for i, t in enumerate(plan.timesteps):
            sigma = f32(plan.sigma(i))
            model_in = np.concatenate([latents] * 2, axis=0) if guidance_scale is not None else latents
            scaled = sched.scale_model_input(plan, i, model_in)
            sample = np.concatenate([scaled, image_cond], axis=1)
            timestep = np.full(n, log32(sigma) * f32(0.25), dtype=np.float32)
            out = self.run("unet", sample=sample, timestep=timestep, encoder_hidden_states=hidden,
                           timestep_cond=timestep_cond)["out_sample"]
            pred = karras_precondition(np.asarray(out, np.float32)[:, :-1], model_in, sigma)
            if guidance_scale is not None:
                pred = apply_guidance(pred, guidance_scale)
            noise = randn(rng, pred.shape) if sched.noise_needed(plan, i) else None
            latents, _, state = sched.step(plan, i, pred, latents, state, noise=noise)
            latents = self.call_callbacks(self, i, t, {"latents": latents}, callback_on_step_end, callback)["latents"]
        return latents


def chain(generator_pipe, upscaler_pipe, prompt, *, generator: Any = None, output_type: str = "pil",
          upscale_kwargs: dict | None = None, **generate_kwargs) -> PipelineOutput:
    """Generate with ``generator_pipe`` (LCM / SD bundle) and upscale its latents 2x with
    ``upscaler_pipe``, handing the latents over without decoding them in between.

    ``generator`` (one noise source, or a seed) is shared, so the upscaler continues drawing where the
    generator stopped, as one diffusers ``torch.Generator`` passed to both pipelines does.
    ``generate_kwargs`` go to the generator, ``upscale_kwargs`` (num_inference_steps, guidance_scale,
    negative_prompt, ...) to the upscaler. Timings of both stages are merged (upscaler stages are
    prefixed ``upscale.``).
    """
    rng = as_noise_source(generator)
    low = generator_pipe(prompt, generator=rng, output_type="latent", **generate_kwargs)
    latents = low.images
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if latents.shape[0] != len(prompts):  # num_images_per_prompt > 1: repeat each prompt for its images
        k = latents.shape[0] // len(prompts)
        prompts = [p for p in prompts for _ in range(k)]
    out = upscaler_pipe(prompts, image=latents, generator=rng, output_type=output_type, **(upscale_kwargs or {}))
    timings = dict(low.timings)
    timings.update({f"upscale.{k}": v for k, v in out.timings.items()})
    return PipelineOutput(images=out.images, timings=timings)
