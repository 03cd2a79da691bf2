"""Stable Diffusion XL (base, LCM-SDXL, SSD-1B, fused LoRAs): text-to-image and image-to-image.

Mirrors diffusers' ``StableDiffusionXLPipeline`` and ``StableDiffusionXLImg2ImgPipeline`` in one
object: passing ``image`` (with ``strength``, default 0.3 as in diffusers) turns text-to-image into
image-to-image. What SDXL adds to Stable Diffusion:

- two text encoders; the UNet cross-attends to both penultimate hidden states, concatenated on
  channels (``hidden_states[-(clip_skip + 2)]``, *not* final-layer-normed), and gets the second
  encoder's projected pooled output as ``text_embeds``;
- micro-conditioning ``time_ids``: (original size, crop top-left, target size), or in image-to-image
  with ``requires_aesthetics_score`` (original size, crop top-left, aesthetic score);
- ``force_zeros_for_empty_prompt``: without a negative prompt, the unconditional embeddings are zeros.

Guidance, exactly as diffusers: classifier-free guidance (doubled batch, :mod:`.guidance`) when
``guidance_scale > 1`` and the UNet has no ``time_cond_proj_dim``. A UNet with one (LCM-SDXL,
LCM-SSD-1B) gets the guidance embedding of ``guidance_scale - 1`` as ``timestep_cond`` and never CFG.
SDXL with LCM-LoRA fused keeps the base UNet (no embedding): run it with ``scheduler="LCMScheduler"``
(or export it with that scheduler) and ``guidance_scale`` 1 (no CFG) to 2.

Micro-conditioning is laid out as each diffusers pipeline does, quirks included: text-to-image
concatenates [negative, positive] time ids *before* repeating them to the batch (rows alternate),
image-to-image repeats first; image-to-image builds the negative time ids with
``crops_coords_top_left`` (not the negative one) unless ``requires_aesthetics_score``. Negative
prompts ignore ``clip_skip`` (diffusers always takes their penultimate layer).

The VAE: diffusers upcasts an fp16 VAE with ``force_upcast`` (the SDXL VAE) to fp32 for decoding and
encoding. Here the bundle fixes each component's precision at export: export an fp16 SDXL bundle with
``--component-precision vae_decoder=fp32 --component-precision vae_encoder=fp32`` (the engine casts
the latents), use a VAE fixed for fp16 (madebyollin/sdxl-vae-fp16-fix), or TAESDXL (``vae="tiny"``).
The manifest's ``vae_force_upcast`` records the model's flag; a warning is logged when an fp16 VAE of a
force_upcast model is used.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

from ..random import as_noise_source
from .base import BasePipeline, PipelineOutput
from .conditioning import check_image_to_image, control_request
from .guidance import denoise, negative_prompt_list, sd_plan
from .ip_adapter import ip_adapter_request, ip_denoise_args
from .lcm import guidance_scale_embedding

logger = logging.getLogger("latentrt")


def _pair(name: str, v) -> tuple[int, int]:
    if v is None:
        return None
    if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(isinstance(x, (int, float, np.number)) for x in v):
        raise ValueError(f"{name} must be a pair (height, width) / (top, left) of numbers; got {v!r}")
    return tuple(v)


def _texts(name: str, v, batch: int) -> list[str]:
    """A str (repeated to the batch) or a list of str of the batch's length."""
    if isinstance(v, str):
        return [v] * batch
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        if len(v) != batch:
            raise ValueError(f"{name} has {len(v)} entries but the prompt batch has {batch}; pass one per prompt "
                             "or a single string")
        return list(v)
    raise TypeError(f"{name} must be a str or a list of str; got {type(v).__name__}")


def cfg_batch(uncond: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """The doubled batch of classifier-free guidance, as diffusers builds it: ``cat([negative, positive])``."""
    return np.concatenate([np.asarray(uncond, np.float32), np.asarray(cond, np.float32)], axis=0)


class SDXLPipeline(BasePipeline):
    required = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
    optional = ("vae_encoder",)

    def __init__(self, bundle, **kw):
        super().__init__(bundle, **kw)
        self.tokenizer_2 = bundle.tokenizer("tokenizer_2")
        k = self.constants
        self.time_cond_proj_dim = k.get("time_cond_proj_dim")
        self.time_ids_dim = int(k["time_ids_dim"])
        for c in ("vae_decoder", "vae_encoder"):
            if k.get("vae_force_upcast") and bundle.has(c) and bundle.manifest.components[c].precision == "fp16":
                logger.warning("%s: %s is fp16 but this VAE overflows in fp16 (force_upcast); expect NaN images unless "
                               "it is an fp16-fixed VAE. Re-export with --component-precision %s=fp32",
                               bundle.path, c, c)

    # -- text ------------------------------------------------------------------------------------
    def _encode(self, component: str, tokenizer, prompts: Sequence[str], clip_skip: int | None):
        ids = tokenizer(list(prompts))
        for p, n in zip(prompts, tokenizer.untruncated_length(list(prompts))):
            if n > tokenizer.model_max_length:
                logger.warning("prompt truncated to %d CLIP tokens (it has %d): %r", tokenizer.model_max_length, n, p)
        out = self.run(component, input_ids=ids, **self.lora_inputs(component))
        stack = out["hidden_states"]  # hidden_states[:-1]: embeddings .. penultimate layer
        skip = 0 if clip_skip is None else clip_skip
        if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or not 0 <= skip < stack.shape[0]:
            raise ValueError(f"clip_skip must be an integer in [0, {stack.shape[0] - 1}] for {component}; got {clip_skip!r}")
        pooled = out.get("text_embeds")
        return np.asarray(stack[-(skip + 1)], np.float32), None if pooled is None else np.asarray(pooled, np.float32)

    def encode_text(self, prompts: list[str], prompts_2: list[str], clip_skip: int | None = None):
        """diffusers' SDXL ``encode_prompt`` for one side: (hidden states of both encoders
        concatenated on channels, pooled projected output of encoder 2)."""
        h1, _ = self._encode("text_encoder", self.tokenizer, prompts, clip_skip)
        h2, pooled = self._encode("text_encoder_2", self.tokenizer_2, prompts_2, clip_skip)
        return np.concatenate([h1, h2], axis=-1), pooled

    def conditioning(self, prompts, batch: int, do_cfg: bool, *, prompt_2=None, negative_prompt=None,
                     negative_prompt_2=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                     negative_pooled_prompt_embeds=None, clip_skip=None):
        """(prompt embeds, negative embeds, pooled, negative pooled) of the prompt batch, not yet repeated
        per image; the negatives are ``None`` without classifier-free guidance."""
        neg = neg_pooled = None
        if prompts is not None:
            embeds, pooled = self.encode_text(prompts, _texts("prompt_2", prompt_2 or prompts, batch), clip_skip)
        else:
            embeds, pooled = np.asarray(prompt_embeds, np.float32), np.asarray(pooled_prompt_embeds, np.float32)
        if do_cfg:
            if negative_prompt_embeds is not None:
                neg, neg_pooled = (np.asarray(negative_prompt_embeds, np.float32),
                                   np.asarray(negative_pooled_prompt_embeds, np.float32))
            elif negative_prompt is None and self.constants.get("force_zeros_for_empty_prompt", True):
                neg, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
            else:
                negs = negative_prompt_list(negative_prompt or "", batch)
                negs_2 = _texts("negative_prompt_2", negative_prompt_2 or negs, batch)
                neg, neg_pooled = self.encode_text(negs, negs_2, None)  # diffusers: always hidden_states[-2]
            if neg.shape != embeds.shape or neg_pooled.shape != pooled.shape:
                raise ValueError(f"negative embeddings {neg.shape}/{neg_pooled.shape} do not match the prompt's "
                                 f"{embeds.shape}/{pooled.shape}")
        return embeds, neg, pooled, neg_pooled

    def encode_prompt(self, prompt: str | list[str], prompt_2: str | list[str] | None = None,
                      negative_prompt: str | list[str] | None = None,
                      negative_prompt_2: str | list[str] | None = None, *, clip_skip: int | None = None,
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool | None = None,
                      lora_scale: float | None = None, lora_weights: dict[str, float] | None = None):
        """diffusers' SDXL ``encode_prompt``: ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds)``, each repeated per image, for the call arguments of the same names.

        The negatives (zeros without a negative prompt when the model has ``force_zeros_for_empty_prompt``)
        are made when classifier-free guidance is on (by default, unless the UNet is an LCM's), else ``None``.
        ``lora_scale`` / ``lora_weights``: the LoRA factors of a ``--lora-mode adapter`` bundle's text encoders."""
        self.select_loras(None, lora_scale, lora_weights)
        prompts, batch = self.prompt_list(prompt, None)
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")
        cfg = not self.time_cond_proj_dim if do_classifier_free_guidance is None else bool(do_classifier_free_guidance)
        out = self.conditioning(prompts, batch, cfg, prompt_2=prompt_2, negative_prompt=negative_prompt,
                                negative_prompt_2=negative_prompt_2, clip_skip=clip_skip)
        embeds, neg, pooled, neg_pooled = (None if x is None else self.repeat_per_prompt(x, num_images_per_prompt)
                                           for x in out)
        return embeds, neg, pooled, neg_pooled

    def time_ids(self, original_size, crops_coords_top_left, third) -> np.ndarray:
        ids = [*original_size, *crops_coords_top_left, *third]
        if len(ids) != self.time_ids_dim:
            hint = ("this UNet expects (original size, crop, aesthetic score): it is a refiner-style model; pass "
                    "image= (image-to-image)" if self.time_ids_dim == 5 else
                    "this UNet expects (original size, crop, target size); the bundle's requires_aesthetics_score "
                    "does not fit it")
            raise ValueError(f"the micro-conditioning has {len(ids)} values but the UNet takes {self.time_ids_dim}; {hint}")
        return np.array([ids], dtype=np.float32)

    # -- the call ----------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        *,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 0.3,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
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
        """``control``: ``control_image`` and the other arguments of ``StableDiffusionXLControlNetPipeline``
        / ``StableDiffusionXLAdapterPipeline`` (:mod:`.conditioning`), text-to-image only.
        ``cross_attention_kwargs={"scale": s}`` (alias ``lora_scale``) and ``lora_weights={name: w}``: the LoRA
        factors of a ``--lora-mode adapter`` bundle (:mod:`.lora_scales`), applied to both text encoders and the UNet."""
        self.start_call()
        self.set_freeu(freeu)  # (s1, s2, b1, b2): the UNet graph's freeu input (freeu.py)
        self.select_loras(cross_attention_kwargs, lora_scale, lora_weights)
        self.select_vae(vae, vae_tiling, vae_slicing)
        self.check_output_type(output_type)
        img2img = image is not None
        ip = ip_adapter_request(self, control)  # ip_adapter_image / _embeds / _scale (.ip_adapter)
        req = control_request(self, control, image_to_image=image is not None)
        if img2img:
            check_image_to_image(req, self, supported=False)
        if num_inference_steps is None:
            num_inference_steps = 4 if self.time_cond_proj_dim else 50
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")
        if img2img and not self.is_latents(image) and latents is None and not (
                self.bundle.has("vae_encoder") or vae == "tiny"):
            raise ValueError(f"{self.bundle.path}: image-to-image needs a vae_encoder, which this bundle lacks")
        if denoising_end is not None and not (isinstance(denoising_end, float) and 0 < denoising_end < 1):
            raise ValueError(f"denoising_end must be a float in (0, 1); got {denoising_end!r}")
        original_size, target_size = _pair("original_size", original_size), _pair("target_size", target_size)
        crops = _pair("crops_coords_top_left", crops_coords_top_left)
        neg_original, neg_target = (_pair("negative_original_size", negative_original_size),
                                    _pair("negative_target_size", negative_target_size))
        neg_crops = _pair("negative_crops_coords_top_left", negative_crops_coords_top_left)
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt_2 or prompt_embeds, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds need pooled_prompt_embeds too (the second text encoder's text_embeds)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds need negative_pooled_prompt_embeds too")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        prompts, batch = self.prompt_list(prompt, prompt_embeds)
        do_cfg = guidance_scale > 1 and not self.time_cond_proj_dim
        n = num_images_per_prompt
        bs = batch * n
        self.check_batch(bs)
        if not img2img:
            height, width = self.default_size(*(req.size(self, height, width) if req else (height, width)))

        # 1. text
        embeds, neg, pooled, neg_pooled = self.conditioning(
            prompts, batch, do_cfg, prompt_2=prompt_2, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, clip_skip=clip_skip)
        embeds, pooled = self.repeat_per_prompt(embeds, n), self.repeat_per_prompt(pooled, n)

        # 2. timesteps and latents (same draw order as diffusers)
        sched = self.get_scheduler(scheduler)
        rng = as_noise_source(generator)
        if img2img:
            plan = sd_plan(sched, num_inference_steps, timesteps, strength)
            if latents is not None:
                latents = np.asarray(latents, dtype=np.float32)
            else:
                latents = self.noised_image_latents(sched, plan, image, bs, rng)
            height, width = latents.shape[2] * self.vae_scale_factor, latents.shape[3] * self.vae_scale_factor
            self.default_size(height, width)
        else:
            plan = sched.plan(None if timesteps is not None else num_inference_steps, timesteps=timesteps)
            latents = self.initial_latents(plan, bs, height, width, rng, latents)

        # 3. micro-conditioning, laid out exactly as each diffusers pipeline does
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        if img2img:
            neg_original, neg_target = neg_original or original_size, neg_target or target_size
            if self.constants.get("requires_aesthetics_score"):
                add = self.time_ids(original_size, crops, (aesthetic_score,))
                add_neg = self.time_ids(neg_original, neg_crops, (negative_aesthetic_score,))
            else:  # diffusers uses crops_coords_top_left (not the negative one) here
                add = self.time_ids(original_size, crops, target_size)
                add_neg = self.time_ids(neg_original, crops, neg_target)
            time_ids = np.repeat(add, bs, axis=0)
            if do_cfg:
                time_ids = cfg_batch(np.repeat(add_neg, bs, axis=0), time_ids)
        else:
            add = self.time_ids(original_size, crops, target_size)
            add_neg = (self.time_ids(neg_original, neg_crops, neg_target)
                       if neg_original is not None and neg_target is not None else add)
            # diffusers concatenates [neg, pos] *before* repeating to the batch: rows alternate
            time_ids = np.tile(cfg_batch(add_neg, add) if do_cfg else add, (bs, 1))
        if do_cfg:
            embeds = cfg_batch(self.repeat_per_prompt(neg, n), embeds)
            pooled = cfg_batch(self.repeat_per_prompt(neg_pooled, n), pooled)

        # 4. denoise (an LCM UNet takes the guidance embedding and never doubles the batch)
        if denoising_end is not None:  # the base half of a base + refiner ensemble
            if sched.name == "LCMScheduler":
                raise ValueError("denoising_end (base + refiner ensembles) is not supported with LCMScheduler")
            N = int(getattr(sched, "num_train_timesteps", 1000))
            cutoff = int(round(N - denoising_end * N))
            plan = dataclasses.replace(plan, timesteps=plan.timesteps[: int((plan.timesteps >= cutoff).sum())])
        unet_inputs = {"text_embeds": pooled, "time_ids": time_ids, **self.lora_inputs("unet")}
        if self.time_cond_proj_dim:
            unet_inputs["timestep_cond"] = guidance_scale_embedding(
                np.full(bs, guidance_scale - 1.0, dtype=np.float32), int(self.time_cond_proj_dim))
        conditioning = req.prepare(self, height, width, batch, n, do_cfg) if req else None
        latents = denoise(self, sched, plan, latents, embeds, rng, guidance_scale=guidance_scale if do_cfg else 1.0,
                          guidance_rescale=guidance_rescale,
                          **ip_denoise_args(ip, self, bs, do_cfg, unet_inputs, conditioning),
                          callback_on_step_end=callback_on_step_end, callback=callback)
        return self.end_call(self.finish(latents, output_type, safety_checker))
