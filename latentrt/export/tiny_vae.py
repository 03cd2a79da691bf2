"""TAESD (diffusers ``AutoencoderTiny``) as an alternative VAE inside a bundle.

On a CPU the SD VAE decoder costs more than four LCM steps together (2480 vs 4 x 677 GFLOP at
512x512); TAESD decodes the same latents for about 141 GFLOP. The bundle gets two extra components,
``tiny_vae_decoder`` and ``tiny_vae_encoder``, next to the full VAE; the runtime picks one per call
(``pipe(..., vae="tiny")``).

Conventions, as diffusers' pipelines use an ``AutoencoderTiny``: the latents are divided by
``vae.config.scaling_factor`` (1.0 for TAESD) before ``decode``, whose graph holds TAESD's own
``tanh(x/3)*3`` clamp and maps [0, 1] to [-1, 1]; ``encode`` maps [-1, 1] to [0, 1] inside and returns
latents directly (no distribution, hence no random draw), which are multiplied by the scaling factor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import components as C
from .recipes import ComponentPlan
from .wrappers import TinyVaeDecoderWrapper, TinyVaeEncoderWrapper


def load_tiny_vae(src: Any, *, revision: str | None = None):
    """An ``AutoencoderTiny`` from a module instance, a local folder (``save_pretrained``) or a hub id
    (``madebyollin/taesd``). Returns (model, source description)."""
    import torch
    from diffusers import AutoencoderTiny

    if isinstance(src, torch.nn.Module):
        if not isinstance(src, AutoencoderTiny):
            raise TypeError(f"tiny_vae must be a diffusers AutoencoderTiny; got {type(src).__name__}")
        return src.eval().float(), {"id": None, "path": None, "class": type(src).__name__}
    src = str(src)
    local = Path(src).is_dir()
    if not local and (src.startswith((".", "/")) or os.sep in src.strip("/").replace("/", "", 1)):
        raise FileNotFoundError(f"--tiny-vae {src}: no such folder (and not a hub id such as madebyollin/taesd)")
    kw = {"revision": revision} if revision and not local else {}
    vae = AutoencoderTiny.from_pretrained(src, **kw).float().eval()
    return vae, {"id": None if local else src, "path": str(Path(src).resolve()) if local else None,
                 "revision": kw.get("revision"), "class": "AutoencoderTiny"}


def tiny_vae_scale_factor(vae) -> int:
    cfg = vae.config
    blocks = cfg.decoder_block_out_channels
    return int(cfg.upsampling_scaling_factor) ** (len(blocks) - 1)


def tiny_vae_plans(vae, constants: dict) -> tuple[list[ComponentPlan], dict]:
    """The two TAESD components and the constants they add; checks that TAESD fits the pipeline's
    latents (channels and x8 factor), since a mismatch would only show as a garbled image."""
    cfg = vae.config
    f = int(constants["vae_scale_factor"])
    if tiny_vae_scale_factor(vae) != f:
        raise ValueError(f"the tiny VAE upsamples x{tiny_vae_scale_factor(vae)}, but this pipeline's latents are x{f}; "
                         "use a TAESD made for this model family (madebyollin/taesd for SD1.x/2.x)")
    if int(cfg.latent_channels) != int(constants["latent_channels"]):
        raise ValueError(f"the tiny VAE has {cfg.latent_channels} latent channels, the pipeline {constants['latent_channels']}; "
                         "use madebyollin/taesd for SD1.x/2.x, madebyollin/taesdxl for SDXL")
    dec = C.tiny_vae_decoder_spec(out_channels=int(cfg.out_channels), latent_channels=int(cfg.latent_channels),
                                  vae_scale_factor=f)
    enc = C.tiny_vae_encoder_spec(in_channels=int(cfg.in_channels), latent_channels=int(cfg.latent_channels),
                                  vae_scale_factor=f)
    plans = [
        ComponentPlan(dec, TinyVaeDecoderWrapper(vae)),
        ComponentPlan(enc, TinyVaeEncoderWrapper(vae), {"sample": (-1, 1)}),
    ]
    return plans, {"tiny_vae_scaling_factor": float(getattr(cfg, "scaling_factor", 1.0))}
