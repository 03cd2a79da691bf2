"""Latent Consistency Models: text-to-image and image-to-image in one pipeline object.

Mirrors diffusers' ``LatentConsistencyModelPipeline`` and ``LatentConsistencyModelImg2ImgPipeline``:
passing ``image`` (with ``strength``) turns text-to-image into image-to-image. LCM has no batch
doubling: guidance enters as the UNet's ``timestep_cond`` embedding of ``w = guidance_scale - 1``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from ..random import as_noise_source
from .base import BasePipeline, PipelineOutput
from .conditioning import check_image_to_image, control_request, image_to_image_size
from .guidance import denoise, do_classifier_free_guidance, encode_prompt, sd_plan
from .ip_adapter import ip_adapter_request, ip_denoise_args
from .prompts import PromptEncoder

logger = logging.getLogger("latentrt")


def guidance_scale_embedding(w: np.ndarray, embedding_dim: int) -> np.ndarray:
    """diffusers' ``get_guidance_scale_embedding``: sinusoidal embedding of ``w * 1000`` in float32."""
    w = np.asarray(w, dtype=np.float32) * np.float32(1000.0)
    half = embedding_dim // 2
    scale = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -scale)
    emb = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if embedding_dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


class LCMPipeline(PromptEncoder, BasePipeline):
    required = ("text_encoder", "unet", "vae_decoder")
    optional = ("vae_encoder",)
    cfg_by_default = False  # guidance enters as the UNet's timestep_cond
    #: guidance enters the UNet per image (its embedding), so one batch may mix guidance scales
    per_image_guidance = True

    @staticmethod
    def per_image_w(guidance_scale, batch: int) -> np.ndarray:
        """``w = guidance_scale - 1`` per image: one scale for all, or a list of one per image."""
        g = np.asarray(guidance_scale, dtype=np.float64)
        if g.ndim == 0:
            g = np.full(batch, float(g))
        if g.shape != (batch,):
            raise ValueError(f"guidance_scale must be a number or a list of one per image ({batch}); got {guidance_scale!r}")
        return (g - 1.0).astype(np.float32)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float | list[float] = 8.5,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        strength: float = 0.8,
        output_type: str = "pil",
        clip_skip: int | None = None,
        scheduler: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback: Callable | None = None,
        negative_prompt: Any = None,
        vae: str = "full",
        vae_tiling: bool | None = None,
        vae_slicing: bool | None = None,
        safety_checker: bool | None = None,  # None: the bundle's checker if it has one (runtime/safety.py)
        freeu: Any = None,
        cross_attention_kwargs: dict | None = None,
        lora_scale: float | None = None,
        lora_weights: dict[str, float] | None = None,
        **control,
    ) -> PipelineOutput:
        """``control``: ``control_image`` and the other conditioning arguments of diffusers' ControlNet
        and T2I-Adapter pipelines (see :mod:`.conditioning`). Image-to-image with a control image follows
        ``StableDiffusionControlNetImg2ImgPipeline``, which treats the LCM UNet as a plain one:
        classifier-free guidance when ``guidance_scale > 1`` (negative prompt included), no guidance
        embedding, and the SD image-to-image cut of the schedule. ``cross_attention_kwargs={"scale": s}``
        (alias ``lora_scale``) and ``lora_weights={name: w}``: the LoRA factors of a ``--lora-mode adapter``
        bundle (:mod:`.lora_scales`)."""
        self.start_call()
        self.set_freeu(freeu)  # (s1, s2, b1, b2): the UNet graph's freeu input (freeu.py)
        self.select_loras(cross_attention_kwargs, lora_scale, lora_weights)
        self.select_vae(vae, vae_tiling, vae_slicing)  # "full" or "tiny" (TAESD, when the bundle has it)
        self.check_output_type(output_type)
        img2img = image is not None
        ip = ip_adapter_request(self, control)  # ip_adapter_image / _embeds / _scale (.ip_adapter)
        req = control_request(self, control, image_to_image=image is not None)
        if img2img:
            check_image_to_image(req, self)
        sd_like = req is not None and img2img  # StableDiffusionControlNetImg2ImgPipeline
        cfg = sd_like and do_classifier_free_guidance(guidance_scale)
        if negative_prompt is not None and not cfg:
            logger.warning("LCM does not use classifier-free guidance: negative_prompt has no effect")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")
        if img2img and not self.bundle.has("vae_encoder") and not self.is_latents(image):
            raise ValueError(f"{self.bundle.path}: image-to-image needs a vae_encoder, which this bundle lacks")
        if not img2img:
            height, width = self.default_size(*(req.size(self, height, width) if req else (height, width)))
        prompts, batch = self.prompt_list(prompt, prompt_embeds)
        sched = self.get_scheduler(scheduler)
        if sd_like:
            plan = sd_plan(sched, num_inference_steps, timesteps, strength)
        else:
            plan = sched.plan(None if timesteps is not None else num_inference_steps, timesteps=timesteps,
                              original_inference_steps=original_inference_steps, strength=strength if img2img else 1.0)
        rng = as_noise_source(generator)
        bs = batch * num_images_per_prompt
        self.check_batch(bs)

        if sd_like:
            cond, uncond, _ = encode_prompt(self, prompt, num_images_per_prompt=num_images_per_prompt, do_cfg=cfg,
                                            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                                            clip_skip=clip_skip)
            embeds = np.concatenate([uncond, cond], axis=0) if cfg else cond
        elif prompts is not None:
            embeds = self.repeat_per_prompt(self.text_embeddings(prompts, clip_skip)["hidden"], num_images_per_prompt)
        else:
            embeds = self.repeat_per_prompt(np.asarray(prompt_embeds, dtype=np.float32), num_images_per_prompt)

        if img2img:
            latents = self.noised_image_latents(sched, plan, image, bs, rng, size=(height, width) if req else (None, None))
            if req is not None:
                height, width = image_to_image_size(req, self, height, width, latents)
        else:
            latents = self.initial_latents(plan, bs, height, width, rng, latents)
        conditioning = req.prepare(self, height, width, batch, num_images_per_prompt, cfg) if req else None

        unet_inputs = self.lora_inputs("unet")  # LoRA adapters' lora_scales ({} without)
        if not sd_like:  # no batch doubling: guidance enters only through the UNet's guidance embedding
            unet_inputs["timestep_cond"] = guidance_scale_embedding(
                self.per_image_w(guidance_scale, bs), int(self.constants["time_cond_proj_dim"]))
        _, denoised = denoise(self, sched, plan, latents, embeds, rng, guidance_scale=guidance_scale if cfg else 1.0,
                              return_denoised=True, **ip_denoise_args(ip, self, bs, cfg, unet_inputs, conditioning),
                              callback_on_step_end=callback_on_step_end, callback=callback)
        return self.end_call(self.finish(denoised, output_type, safety_checker))
