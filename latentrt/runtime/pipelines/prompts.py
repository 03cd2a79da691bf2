"""Public ``encode_prompt`` of the pipelines with one CLIP text encoder (LCM, SD, unCLIP's decoder).

A service can encode each prompt once and pass the result back as ``prompt_embeds`` /
``negative_prompt_embeds`` on later calls: the image is the one the prompt gives. SDXL (two encoders,
pooled embeddings) and the latent upscaler (pre-norm hidden states, pooled embeddings) define their own
``encode_prompt`` with diffusers' return values for those pipelines.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import guidance


class PromptEncoder:
    """Mixin of :class:`~.base.BasePipeline` subclasses whose UNet cross-attends to one text encoder."""

    #: whether ``encode_prompt`` makes the negative embeddings by default (LCM never guides by batch doubling)
    cfg_by_default = True

    def encode_prompt(self, prompt: str | list[str], negative_prompt: Any = None, *, clip_skip: int | None = None,
                      num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool | None = None, lora_scale: float | None = None,
                      lora_weights: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """diffusers' ``encode_prompt``: ``(prompt_embeds, negative_prompt_embeds)``, each repeated per image.

        The negative embeddings (of ``negative_prompt``, default "") are made when classifier-free
        guidance is on (by default, except for LCM), else ``None``. As in diffusers, ``clip_skip`` applies
        to the prompt only. Pass the results as ``prompt_embeds=`` / ``negative_prompt_embeds=`` (with
        ``num_images_per_prompt=1`` if they were repeated here already). ``lora_scale`` / ``lora_weights``:
        the LoRA factors of a ``--lora-mode adapter`` bundle's text encoder, as in a call (:mod:`.lora_scales`)."""
        self.select_loras(None, lora_scale, lora_weights)
        if prompt is None:
            raise ValueError("encode_prompt needs a prompt (str or list of str)")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")
        cfg = self.cfg_by_default if do_classifier_free_guidance is None else bool(do_classifier_free_guidance)
        cond, uncond, _ = guidance.encode_prompt(self, prompt, num_images_per_prompt=num_images_per_prompt, do_cfg=cfg,
                                                 negative_prompt=negative_prompt, clip_skip=clip_skip)
        return cond, uncond
