"""Export with another VAE than the checkpoint's: ``export_bundle(..., vae=SRC)`` / ``--vae SRC``.

The SDXL VAE overflows in fp16 (diffusers upcasts it to fp32 whenever ``force_upcast`` is set).
Two ways out in a bundle: keep ``vae_decoder`` / ``vae_encoder`` in fp32
(``--component-precision vae_decoder=fp32``), or swap in a VAE fine-tuned to stay in the fp16 range,
``madebyollin/sdxl-vae-fp16-fix``, and run everything in fp16. This module does the swap: it loads an
``AutoencoderKL`` (hub id, local folder, or a module) and checks that its latents fit the pipeline's
(channels and x8 factor), since a mismatch would only show as a garbled image.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any


def load_vae(src: Any, *, revision: str | None = None):
    """An ``AutoencoderKL`` from a module, a local folder (``save_pretrained``) or a hub id.
    Returns (model, source description for the manifest)."""
    import torch
    from diffusers import AutoencoderKL

    if isinstance(src, torch.nn.Module):
        if not isinstance(src, AutoencoderKL):
            raise TypeError(f"vae must be a diffusers AutoencoderKL; got {type(src).__name__} "
                            "(a TAESD AutoencoderTiny goes to tiny_vae= / --tiny-vae)")
        return src.eval().float(), {"id": None, "path": None, "class": type(src).__name__}
    src = str(src)
    local = Path(src).is_dir()
    if not local and (src.startswith((".", "/")) or os.sep in src.strip("/").replace("/", "", 1)):
        raise FileNotFoundError(f"--vae {src}: no such folder (and not a hub id such as madebyollin/sdxl-vae-fp16-fix)")
    kw = {"revision": revision} if revision and not local else {}
    vae = AutoencoderKL.from_pretrained(src, **kw).float().eval()
    return vae, {"id": None if local else src, "path": str(Path(src).resolve()) if local else None,
                 "revision": kw.get("revision"), "class": "AutoencoderKL"}


def swap_vae(pipe, src: Any, *, copy_pipe: bool = True):
    """``pipe`` with its VAE replaced by the one at ``src`` (a shallow copy of ``pipe`` when
    ``copy_pipe``, so the caller's pipeline keeps its own). Returns (pipe, source description)."""
    vae, source = load_vae(src)
    old = pipe.vae
    for key in ("latent_channels", "in_channels", "out_channels"):
        if int(getattr(vae.config, key)) != int(getattr(old.config, key)):
            raise ValueError(f"--vae: the new VAE has {key}={getattr(vae.config, key)} but the pipeline's has "
                             f"{getattr(old.config, key)}; use a VAE made for this model family")
    if len(vae.config.block_out_channels) != len(old.config.block_out_channels):
        raise ValueError(f"--vae: the new VAE downsamples x{2 ** (len(vae.config.block_out_channels) - 1)}, the "
                         f"pipeline's x{2 ** (len(old.config.block_out_channels) - 1)}")
    if copy_pipe:
        pipe = copy.copy(pipe)
    pipe.vae = vae
    return pipe, source
