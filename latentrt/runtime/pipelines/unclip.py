"""Stable unCLIP: an SD 2.x UNet conditioned on a (noised) CLIP image embedding.

Mirrors diffusers' ``StableUnCLIPPipeline`` (kind "unclip": the prompt goes through a CLIP text
encoder with projection and a PriorTransformer, sampled with its own DDPM scheduler and guidance,
into an image embedding) and ``StableUnCLIPImg2ImgPipeline`` (kind "unclip_img2img": image
variations, the embedding comes from a CLIP vision encoder, or is given as ``image_embeds``).

Both then share the decoder: ``noise_image_embeddings`` (normalize, noise to ``noise_level`` on the
noising schedule, unnormalize, append the sinusoidal embedding of ``noise_level``) gives the UNet's
``class_labels``; the UNet loop runs classifier-free guidance with a zero image embedding for the
unconditional half; the VAE decodes. Random draws, in diffusers' order: prior latents, one variance
draw per prior step but the last, the embedding noise, the UNet latents, then DDIM's eta noise.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np

from ...manifest import BundleError, sha256_file
from ..clip_image import CLIPImageConfig, clip_preprocess, is_pixel_values
from ..random import as_noise_source, randn
from ..schedulers import get_scheduler
from .base import BasePipeline, PipelineOutput
from .guidance import apply_guidance, denoise, do_classifier_free_guidance, encode_prompt
from .prompts import PromptEncoder

try:
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None


def timestep_embedding(timesteps: np.ndarray, dim: int, *, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       max_period: float = 10000.0) -> np.ndarray:
    """diffusers' ``get_timestep_embedding`` in float32."""
    half = dim // 2
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    emb = np.asarray(timesteps, dtype=np.float32)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def _is_text(x) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(p, str) for p in x))


class _UnCLIPBase(PromptEncoder, BasePipeline):
    """What both unCLIP pipelines share: embedding statistics, the noising scheduler, the decoder."""

    def __init__(self, bundle, **kw):
        super().__init__(bundle, **kw)
        self.stats = self._load_stats()
        self.noising_scheduler = get_scheduler(bundle.scheduler_config("image_noising_scheduler"))
        self.embed_dim = int(self.constants["image_embed_dim"])

    def _load_stats(self) -> dict[str, np.ndarray]:
        info = (self.bundle.manifest.extra.get("unclip") or {}).get("embedding_stats")
        if not info:
            raise BundleError(f"{self.bundle.path}: the manifest has no unCLIP embedding statistics; re-export it")
        path = self.bundle.file(info["path"], "unCLIP embedding statistics")
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            raise BundleError(f"{self.bundle.path}: {info['path']} is missing or corrupted (sha256 does not match "
                              "the manifest); re-export the bundle")
        with np.load(io.BytesIO(path.read_bytes())) as z:
            return {k: z[k].astype(np.float32) for k in z.files}

    # -- checks ------------------------------------------------------------------------------------
    def check_noise_level(self, noise_level) -> int:
        n = self.noising_scheduler.num_train_timesteps
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)) or not 0 <= noise_level < n:
            raise ValueError(f"noise_level must be an integer in [0, {n - 1}] (the image noising scheduler's "
                             f"num_train_timesteps - 1); got {noise_level!r}")
        return int(noise_level)

    def check_embeds(self, embeds, name: str) -> np.ndarray:
        e = np.asarray(embeds, dtype=np.float32)
        if e.ndim != 2 or e.shape[1] != self.embed_dim:
            raise ValueError(f"{name} must have shape (batch, {self.embed_dim}) for this bundle (its CLIP image "
                             f"embeddings are {self.embed_dim} wide); got shape {e.shape}")
        return e

    # -- the decoder ---------------------------------------------------------------------------------
    def noise_image_embeddings(self, embeds: np.ndarray, noise_level: int, rng) -> np.ndarray:
        """diffusers' ``noise_image_embeddings``: -> (batch, 2 * dim) ``class_labels``."""
        noise = randn(rng, embeds.shape)
        mean, std = self.stats["normalizer_mean"], self.stats["normalizer_std"]
        x = (embeds - mean) / std
        x = self.noising_scheduler.add_noise_at(x, noise, noise_level)
        x = x * std + mean
        level = timestep_embedding(np.full(embeds.shape[0], noise_level), embeds.shape[1])
        return np.concatenate([x, level], axis=1).astype(np.float32)

    def prompt_embeddings(self, prompt, negative_prompt, n: int, cfg: bool, clip_skip=None,
                          prompt_embeds=None, negative_prompt_embeds=None) -> np.ndarray:
        """SD ``encode_prompt`` (shared with the SD pipelines): [negative; positive] when ``cfg``."""
        cond, uncond, _ = encode_prompt(self, prompt, num_images_per_prompt=n, do_cfg=cfg,
                                        negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                                        negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
        return np.concatenate([uncond, cond], axis=0) if cfg else cond

    def decode_loop(self, *, class_labels, embeds, batch, height, width, num_inference_steps, guidance_scale,
                    eta, latents, rng, scheduler, callback, callback_on_step_end, output_type) -> PipelineOutput:
        """Latents -> the SD denoising loop with ``class_labels`` (zeros for the unconditional half) -> decode."""
        cfg = do_classifier_free_guidance(guidance_scale)
        if cfg:
            class_labels = np.concatenate([np.zeros_like(class_labels), class_labels], axis=0)
        sched = self.get_scheduler(scheduler)
        plan = sched.plan(num_inference_steps)
        latents = self.initial_latents(plan, batch, height, width, rng, latents)
        latents = denoise(self, sched, plan, latents, embeds, rng, guidance_scale=guidance_scale, eta=eta,
                          unet_inputs={"class_labels": class_labels}, callback_on_step_end=callback_on_step_end,
                          callback=callback)
        return self.finish(latents, output_type)

    @staticmethod
    def check_count(n) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {n!r}")
        return int(n)


class UnCLIPPipeline(_UnCLIPBase):
    """Text-to-image through the prior (diffusers' ``StableUnCLIPPipeline``)."""

    required = ("prior_text_encoder", "prior", "text_encoder", "unet", "vae_decoder")

    def __init__(self, bundle, **kw):
        super().__init__(bundle, **kw)
        self.prior_tokenizer = bundle.tokenizer("prior_tokenizer")
        self.prior_scheduler = get_scheduler(bundle.scheduler_config("prior_scheduler"))

    def encode_prior_prompt(self, prompts, n: int, cfg: bool):
        """``_encode_prior_prompt``: (text_embeds, hidden states, attention mask), [uncond, cond] with ``cfg``."""
        def encode(texts):
            tok = self.prior_tokenizer
            ids = tok(texts)
            lengths = np.minimum(tok.untruncated_length(texts), ids.shape[1])
            mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
            out = self.run("prior_text_encoder", input_ids=ids)
            return [np.asarray(out["text_embeds"], np.float32), np.asarray(out["last_hidden_state"], np.float32), mask]

        cond = [np.repeat(a, n, axis=0) for a in encode(prompts)]
        if not cfg:
            return cond
        uncond = [np.repeat(a, n, axis=0) for a in encode([""] * len(prompts))]
        return [np.concatenate([u, c], axis=0) for u, c in zip(uncond, cond)]

    def run_prior(self, prompts, n, steps, guidance, prior_latents, rng, callback) -> np.ndarray:
        cfg = do_classifier_free_guidance(guidance)
        proj, hidden, mask = self.encode_prior_prompt(prompts, n, cfg)
        sched = self.prior_scheduler
        plan = sched.plan(steps)
        shape = (len(prompts) * n, int(self.constants["prior_embedding_dim"]))
        lat = self.start_noise(plan, shape, rng, prior_latents, "prior_latents")
        state = sched.init_state(plan)
        for i, t in enumerate(plan.timesteps):
            x = np.concatenate([lat, lat]) if cfg else lat
            x = sched.scale_model_input(plan, i, x)
            pred = self.run("prior", hidden_states=x, timestep=np.full(x.shape[0], t, dtype=np.int64),
                            proj_embedding=proj, encoder_hidden_states=hidden,
                            attention_mask=mask)["predicted_image_embedding"]
            pred = apply_guidance(pred, guidance) if cfg else np.asarray(pred, dtype=np.float32)
            noise = randn(rng, pred.shape) if sched.noise_needed(plan, i) else None
            lat, _, state = sched.step(plan, i, pred, lat, state, noise=noise)
            if callback is not None:
                callback(i, t, lat)
        return lat * self.stats["prior_clip_std"] + self.stats["prior_clip_mean"]

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 10.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        callback: Callable | None = None,
        callback_on_step_end: Callable | None = None,
        noise_level: int = 0,
        prior_num_inference_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        prior_latents: np.ndarray | None = None,
        clip_skip: int | None = None,
        scheduler: str | None = None,
        vae_tiling: bool | None = None,
        vae_slicing: bool | None = None,
    ) -> PipelineOutput:
        """Text -> image. ``callback(i, t, latents)`` is called after every prior step and every UNet
        step, as diffusers does."""
        self.start_call()
        self.set_vae_options(vae_tiling, vae_slicing)
        if prompt is None:
            raise ValueError("pass a prompt (str or list of str): the prior turns it into the image embedding")
        prompts, batch = self.prompt_list(prompt, None)
        n = self.check_count(num_images_per_prompt)
        noise_level = self.check_noise_level(noise_level)
        height, width = self.default_size(height, width)
        self.check_batch(batch * n)
        rng = as_noise_source(generator)

        embeds = self.run_prior(prompts, n, prior_num_inference_steps, prior_guidance_scale, prior_latents, rng,
                                callback)
        cfg = do_classifier_free_guidance(guidance_scale)
        text = self.prompt_embeddings(prompts, negative_prompt, n, cfg, clip_skip)
        class_labels = self.noise_image_embeddings(embeds, noise_level, rng)
        out = self.decode_loop(class_labels=class_labels, embeds=text, batch=batch * n, height=height, width=width,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                               latents=latents, rng=rng, scheduler=scheduler, callback=callback,
                               callback_on_step_end=callback_on_step_end, output_type=output_type)
        return self.end_call(out)


class UnCLIPImg2ImgPipeline(_UnCLIPBase):
    """Image variations (diffusers' ``StableUnCLIPImg2ImgPipeline``): a CLIP image embedding, from
    ``image`` through the vision encoder or given as ``image_embeds``, conditions the UNet."""

    required = ("image_encoder", "text_encoder", "unet", "vae_decoder")

    def __init__(self, bundle, **kw):
        super().__init__(bundle, **kw)
        self.clip_image_config = CLIPImageConfig.from_dir(bundle.file("feature_extractor", "feature extractor folder"))

    def _single_image(self, image) -> bool:
        """A lone picture is repeated to the whole batch; a list or pixel_values batch per prompt."""
        if Image is not None and isinstance(image, Image.Image):
            return True
        return isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3)

    def encode_image(self, image, image_embeds, batch: int, n: int, noise_level: int, rng) -> np.ndarray:
        repeat_by = batch if self._single_image(image) else n
        if image_embeds is None:
            pixels = clip_preprocess(image, self.clip_image_config)
            image_embeds = self.run("image_encoder", pixel_values=pixels)["image_embeds"]
            embeds = np.asarray(image_embeds, dtype=np.float32)
        else:
            embeds = self.check_embeds(image_embeds, "image_embeds")
        labels = np.repeat(self.noise_image_embeddings(embeds, noise_level, rng), repeat_by, axis=0)
        if labels.shape[0] != batch:
            raise ValueError(f"{embeds.shape[0]} image(s) / image embedding(s) for {batch // n} prompt(s): pass one "
                             "image (used for every prompt) or one per prompt")
        return labels

    def __call__(
        self,
        prompt: Any = None,
        image: Any = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 10.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        callback: Callable | None = None,
        callback_on_step_end: Callable | None = None,
        noise_level: int = 0,
        image_embeds: np.ndarray | None = None,
        clip_skip: int | None = None,
        scheduler: str | None = None,
        vae_tiling: bool | None = None,
        vae_slicing: bool | None = None,
    ) -> PipelineOutput:
        """Image variation; ``prompt`` (default "") steers it. ``image``: a PIL image, a uint8 array,
        a list of them, or CLIP ``pixel_values`` (N, 3, crop, crop); or pass ``image_embeds`` instead.

        The prompt comes first, as in every latentrt pipeline; diffusers' order (the image first,
        ``pipe(image)``) works too: a first argument that is not text is taken as the image."""
        self.start_call()
        self.set_vae_options(vae_tiling, vae_slicing)
        if image is None and prompt is not None and not _is_text(prompt):
            image, prompt = prompt, None
        if image is None and image_embeds is None:
            raise ValueError("an image variation needs an image or image_embeds (its CLIP image embedding); pass one")
        if image is not None and image_embeds is not None:
            raise ValueError("pass either image or image_embeds, not both")
        if image is not None and not (self._single_image(image) or isinstance(image, (list, tuple))
                                      or is_pixel_values(image, self.clip_image_config)):
            raise TypeError(f"image must be a PIL image, a uint8 array, a list of them or CLIP pixel_values of shape "
                            f"(N, 3, {self.clip_image_config.crop_hw[0]}, {self.clip_image_config.crop_hw[1]}); got "
                            f"{type(image).__name__}{getattr(image, 'shape', '')}")
        if prompt is None and prompt_embeds is None:
            prompt = [""] * len(image) if isinstance(image, (list, tuple)) else ""
        _, batch = self.prompt_list(prompt, prompt_embeds)
        n = self.check_count(num_images_per_prompt)
        noise_level = self.check_noise_level(noise_level)
        height, width = self.default_size(height, width)
        self.check_batch(batch * n)
        rng = as_noise_source(generator)

        cfg = do_classifier_free_guidance(guidance_scale)
        text = self.prompt_embeddings(prompt, negative_prompt, n, cfg, clip_skip, prompt_embeds,
                                      negative_prompt_embeds)
        class_labels = self.encode_image(image, image_embeds, batch * n, n, noise_level, rng)
        out = self.decode_loop(class_labels=class_labels, embeds=text, batch=batch * n, height=height, width=width,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                               latents=latents, rng=rng, scheduler=scheduler, callback=callback,
                               callback_on_step_end=callback_on_step_end, output_type=output_type)
        return self.end_call(out)
