"""Stable Diffusion 1.x / 2.x: text-to-image and image-to-image in one pipeline object.

Mirrors diffusers' ``StableDiffusionPipeline`` and ``StableDiffusionImg2ImgPipeline`` (passing
``image`` with ``strength`` switches to image-to-image, as diffusers' AutoPipeline does), with
classifier-free guidance by batch doubling (see :mod:`.guidance`), any runtime scheduler (the bundle's,
or ``scheduler="EulerAncestralDiscreteScheduler"`` per call, built from the bundle's config), epsilon
and v-prediction UNets (the prediction type lives in the scheduler config), and LCM-LoRA bundles
(``scheduler="LCMScheduler"``, a few steps, ``guidance_scale`` about 1).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..random import as_noise_source
from .base import BasePipeline, PipelineOutput
from .conditioning import check_image_to_image, control_request, image_to_image_size
from .guidance import check_strength, denoise, do_classifier_free_guidance, encode_prompt, sd_plan
from .ip_adapter import ip_adapter_request, ip_denoise_args
from .prompts import PromptEncoder


class StableDiffusionPipeline(PromptEncoder, BasePipeline):
    required = ("text_encoder", "unet", "vae_decoder")
    optional = ("vae_encoder",)

    def plan(self, num_inference_steps: int | None = 50, *, strength: float = 1.0, scheduler: str | None = None,
             timesteps: list[int] | None = None):
        """The steps a call with these arguments runs (``strength`` < 1: image-to-image's cut)."""
        return sd_plan(self.get_scheduler(scheduler), num_inference_steps, timesteps, strength)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        *,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        scheduler: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback: Callable | None = None,
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
        """diffusers' argument names and defaults (50 steps, guidance 7.5, strength 0.8, eta 0).

        ``eta`` is used by DDIM only (as in diffusers). ``image``: PIL / numpy image(s), or SD latents
        (float NCHW with the VAE's latent channels). ``latents``: the initial noise of text-to-image.
        ``vae``: ``"full"`` or ``"tiny"`` (the bundle's TAESD, when exported with ``--tiny-vae``).
        ``control``: ``control_image`` and the other arguments of diffusers' ControlNet / T2I-Adapter
        pipelines (:mod:`.conditioning`); with ``image`` it is ``StableDiffusionControlNetImg2ImgPipeline``.
        ``cross_attention_kwargs={"scale": s}`` (alias ``lora_scale``) and ``lora_weights={name: w}``: the LoRA
        factors of a ``--lora-mode adapter`` bundle (:mod:`.lora_scales`).
        """
        self.start_call()
        self.set_freeu(freeu)  # (s1, s2, b1, b2): the UNet graph's freeu input (freeu.py)
        self.select_loras(cross_attention_kwargs, lora_scale, lora_weights)
        self.select_vae(vae, vae_tiling, vae_slicing)
        self.check_output_type(output_type)
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")
        if not 0.0 <= float(guidance_rescale) <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1]; got {guidance_rescale!r}")
        img2img = image is not None
        ip = ip_adapter_request(self, control)  # ip_adapter_image / _embeds / _scale (.ip_adapter)
        req = control_request(self, control, image_to_image=image is not None)
        if img2img:
            check_image_to_image(req, self)
            check_strength(strength)
            if latents is not None:
                raise ValueError("latents (the initial noise) is for text-to-image; for image-to-image pass the "
                                 "image latents as image=")
            if vae != "tiny" and not self.bundle.has("vae_encoder") and not self.is_latents(image):
                raise ValueError(f"{self.bundle.path}: image-to-image needs a vae_encoder, which this bundle lacks")
        else:
            height, width = self.default_size(*(req.size(self, height, width) if req else (height, width)))
        self.check_batch(self.prompt_list(prompt, prompt_embeds)[1] * num_images_per_prompt)
        cfg = do_classifier_free_guidance(guidance_scale)
        sched = self.get_scheduler(scheduler)
        plan = sd_plan(sched, num_inference_steps, timesteps, strength if img2img else 1.0)
        rng = as_noise_source(generator)

        cond, uncond, batch = encode_prompt(
            self, prompt, num_images_per_prompt=num_images_per_prompt, do_cfg=cfg, negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
        embeds = np.concatenate([uncond, cond], axis=0) if cfg else cond
        bs = batch * num_images_per_prompt

        if img2img:
            latents = self.noised_image_latents(sched, plan, image, bs, rng, size=(height, width) if req else (None, None))
            if req is not None:
                height, width = image_to_image_size(req, self, height, width, latents)
        else:
            latents = self.initial_latents(plan, bs, height, width, rng, latents)
        conditioning = req.prepare(self, height, width, batch, num_images_per_prompt, cfg) if req else None

        latents = denoise(self, sched, plan, latents, embeds, rng, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, eta=eta, callback_on_step_end=callback_on_step_end,
                          callback=callback,
                          **ip_denoise_args(ip, self, bs, cfg, self.lora_inputs("unet"), conditioning))
        return self.end_call(self.finish(latents, output_type, safety_checker))
