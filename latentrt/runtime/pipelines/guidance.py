"""Classifier-free guidance and the denoising loop around it, shared by the SD-family pipelines.

diffusers' ``StableDiffusionPipeline`` (and SDXL, the upscalers, unCLIP after it) guides by batch
doubling: the negative ("unconditional") embeddings go first, the prompt's second, the UNet runs once
on both halves, and ``uncond + guidance_scale * (text - uncond)`` is the prediction the scheduler
steps with. Guidance is off at ``guidance_scale <= 1`` (one half only). The pieces here are small
functions so a pipeline with other UNet inputs can reuse them:

* :func:`encode_prompt` - prompt / negative prompt (or their embeddings) -> (cond, uncond) repeated
  per image, with diffusers' rules (the negative prompt ignores ``clip_skip``);
* :func:`apply_guidance` and :func:`rescale_noise_cfg` - the guidance arithmetic;
* :func:`sd_plan` - the timesteps as the SD pipelines iterate them (img2img cuts the schedule);
* :func:`denoise` - the loop: double, scale, UNet, guide, scheduler step (noise drawn as diffusers
  does), callbacks.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from ..random import NoiseSource, randn
from ..schedulers import Plan, Scheduler
from ..schedulers.base import as_float32, img2img_start
from .device_loop import concat2, like, to_host, use_device_loop

logger = logging.getLogger("latentrt")


def do_classifier_free_guidance(guidance_scale: float) -> bool:
    """diffusers: ``guidance_scale > 1`` (and the UNet has no LCM guidance embedding)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"guidance_scale must be a number; got {guidance_scale!r}")
    return float(guidance_scale) > 1.0


def negative_prompt_list(negative_prompt: Any, batch: int) -> list[str]:
    """``None`` -> empty prompts; a str applies to every prompt; a list must match the prompts."""
    if negative_prompt is None:
        return [""] * batch
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    if isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
        if len(negative_prompt) != batch:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but there are {batch} prompts; pass one "
                f"negative prompt per prompt, or a single str for all of them"
            )
        return list(negative_prompt)
    raise TypeError(f"negative_prompt must be a str or a list of str; got {type(negative_prompt).__name__}")


def encode_prompt(
    pipe,
    prompt: Any = None,
    *,
    num_images_per_prompt: int = 1,
    do_cfg: bool,
    negative_prompt: Any = None,
    prompt_embeds: Any = None,
    negative_prompt_embeds: Any = None,
    clip_skip: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """diffusers' ``encode_prompt``: (cond, uncond or None, number of prompts).

    Both embeddings come back repeated per image ([p0, p0, p1, p1] for two images per prompt). As in
    diffusers, ``clip_skip`` applies to the prompt only: negative embeddings are the text encoder's
    last hidden state. ``pipe`` is a :class:`~latentrt.runtime.pipelines.base.BasePipeline`.
    """
    prompts, batch = pipe.prompt_list(prompt, prompt_embeds)
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
    negatives = negative_prompt_list(negative_prompt, batch) if negative_prompt_embeds is None else None
    if prompts is not None:
        cond = pipe.text_embeddings(prompts, clip_skip)["hidden"]
    else:
        cond = np.asarray(prompt_embeds, dtype=np.float32)
    uncond = None
    if negative_prompt_embeds is not None:
        uncond = np.asarray(negative_prompt_embeds, dtype=np.float32)
        if uncond.shape != cond.shape:
            raise ValueError(f"negative_prompt_embeds have shape {uncond.shape} but the prompt embeddings have "
                             f"{cond.shape}; they must match (one negative per prompt)")
    if not do_cfg:
        if negative_prompt is not None or negative_prompt_embeds is not None:
            logger.warning("guidance_scale <= 1 turns classifier-free guidance off: the negative prompt has no effect")
        uncond = None
    elif uncond is None:
        uncond = pipe.text_embeddings(negatives, None)["hidden"]
    cond = pipe.repeat_per_prompt(cond, num_images_per_prompt)
    if uncond is not None:
        uncond = pipe.repeat_per_prompt(uncond, num_images_per_prompt)
    return cond, uncond, batch


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """diffusers' ``rescale_noise_cfg`` (Lin et al. 2023, section 3.4): match the guided prediction's
    per-sample std to the text prediction's, mixed by ``guidance_rescale`` (torch's unbiased std)."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1, dtype=np.float32)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1, dtype=np.float32)
    rescaled = noise_cfg * (std_text / std_cfg)
    g = np.float32(guidance_rescale)
    return (g * rescaled + (np.float32(1) - g) * noise_cfg).astype(np.float32, copy=False)


def apply_guidance(pred: np.ndarray, guidance_scale: float, guidance_rescale: float = 0.0) -> np.ndarray:
    """[uncond; text] UNet output of a doubled batch -> the guided prediction (float32); numpy arrays
    or device tensors (the device loop)."""
    pred = np.asarray(pred, dtype=np.float32) if isinstance(pred, np.ndarray) else as_float32(pred)
    half = pred.shape[0] // 2
    uncond, text = pred[:half], pred[half:]
    out = uncond + float(guidance_scale) * (text - uncond)  # a weak scalar: float32 arithmetic
    if guidance_rescale > 0.0:
        out = rescale_noise_cfg(out, text, guidance_rescale)
    return out


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in the range (0, 1] (the fraction of the schedule to denoise); "
                         f"got {strength!r}")
    return float(strength)


def sd_plan(sched: Scheduler, num_inference_steps: int | None, timesteps=None, strength: float = 1.0) -> Plan:
    """The timesteps ``StableDiffusion(Img2Img)Pipeline`` iterates: ``retrieve_timesteps`` and, for
    image-to-image, ``get_timesteps``' cut at ``int(n * strength)`` with ``set_begin_index``.

    Every runtime scheduler's ``plan(strength=...)`` makes that cut except LCM's, whose ``strength``
    follows ``LatentConsistencyModelImg2ImgPipeline`` (it shortens the distillation schedule); in an SD
    pipeline an LCM schedule (LCM-LoRA) is cut like the others.
    """
    strength = check_strength(strength)
    n = None if timesteps is not None else num_inference_steps
    if sched.name != "LCMScheduler":
        return sched.plan(n, timesteps=timesteps, strength=strength)
    full = sched.plan(n, timesteps=timesteps)
    if strength == 1.0:
        return full
    start = img2img_start(full.num_inference_steps, strength)
    return Plan(full.timesteps[start:], full.num_inference_steps, full.init_noise_sigma, begin_index=start,
                schedule_timesteps=full.timesteps)


def denoise(
    pipe,
    sched: Scheduler,
    plan: Plan,
    latents: np.ndarray,
    encoder_hidden_states: np.ndarray,
    rng: NoiseSource,
    *,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    unet: str = "unet",
    unet_inputs: dict | None = None,
    callback_on_step_end: Callable | None = None,
    callback: Callable | None = None,
    return_denoised: bool = False,
    conditioning=None,
):
    """The denoising loop of every UNet pipeline. ``encoder_hidden_states`` is already doubled
    ([uncond; cond]) when guidance is on; ``unet_inputs`` are further UNet inputs of the (doubled)
    batch (``timestep_cond`` for LCMs, ``class_labels`` for unCLIP, ...).

    Callbacks see ``latents`` and ``prompt_embeds`` (the doubled embeddings, as in diffusers) and may
    replace them. With ``return_denoised`` (LCM, whose result is the last step's denoised sample, not
    its ``prev_sample``) callbacks also see ``denoised`` and the loop returns ``(latents, denoised)``.

    ``conditioning`` (a :class:`~.conditioning.Conditioning`: ControlNets, T2I-Adapter) picks each
    step's UNet graph and gives its residual inputs; the loop then stays on the host."""
    cfg = do_classifier_free_guidance(guidance_scale)
    extra = dict(unet_inputs or {})
    state = sched.init_state(plan)
    denoised = latents
    on_device = conditioning is None and use_device_loop(pipe.engines[unet], sched, guidance_rescale)  # device_loop.py
    run = pipe.run_on_device if on_device else pipe.run_lazy
    reused = getattr(pipe.engines[unet], "outputs_are_reused", False)
    for i, t in enumerate(plan.timesteps):
        model_in = concat2(latents) if cfg else latents
        model_in = sched.scale_model_input(plan, i, model_in)
        inputs = dict(sample=model_in, timestep=np.full(model_in.shape[0], t, dtype=np.float32),
                      encoder_hidden_states=encoder_hidden_states, **extra)
        step_unet, residuals = (unet, {}) if conditioning is None else conditioning.unet_inputs(
            pipe, i, len(plan.timesteps), inputs, unet)
        raw = run(step_unet, **inputs, **residuals)["out_sample"]
        pred = apply_guidance(raw, guidance_scale, guidance_rescale) if cfg else (
            as_float32(raw) if on_device else np.asarray(raw, np.float32))
        if pred is raw and on_device and reused:  # the engine's output buffer: schedulers may keep it (PNDM)
            pred = pred.clone()
        latents = like(pred, latents) if on_device else latents  # onto the device once (a no-op after)
        noise = randn(rng, pred.shape) if sched.noise_needed(plan, i, eta=eta) else None
        noise = like(pred, noise) if on_device and noise is not None else noise
        latents, denoised, state = sched.step(plan, i, pred, latents, state, noise=noise, eta=eta)
        tensors = {"latents": latents, "prompt_embeds": encoder_hidden_states}
        if return_denoised:
            tensors["denoised"] = denoised
        tensors = pipe.call_callbacks(pipe, i, t, tensors, callback_on_step_end, callback)
        latents, encoder_hidden_states = tensors["latents"], tensors["prompt_embeds"]
        denoised = tensors.get("denoised", denoised)
    if on_device:  # back to the host once, after the loop
        latents, denoised = to_host(latents), to_host(denoised)
    return (latents, denoised) if return_denoised else latents
