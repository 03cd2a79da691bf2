"""Tiny random ControlNets and T2I-Adapters for the tiny pipelines of :mod:`latentrt.export.tiny`.

diffusers initialises a ControlNet's "zero convolutions" (the 1x1 convs on every residual, and the
conditioning embedding's last conv) to zero, so an untrained ControlNet changes nothing and a parity
test with one would be blind. Here they get random non-zero weights, large enough that the control
image visibly changes the result.
"""

from __future__ import annotations

from pathlib import Path


def randomize_zero_convs(controlnet, seed: int, std: float = 0.3):
    import torch

    g = torch.Generator().manual_seed(seed)
    convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
             controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * std)
    return controlnet


def tiny_controlnet(unet, seed: int = 11, *, conditioning_channels: int = 3):
    """A ControlNetModel shaped like ``unet`` (diffusers' ``from_unet``: same down blocks, SDXL's added
    conditioning when the UNet has it), random weights everywhere, zero convolutions included."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8), load_weights_from_unet=False,
                                   conditioning_channels=conditioning_channels)
    return randomize_zero_convs(cn, seed).eval()


def tiny_adapter(seed: int = 21, *, sdxl: bool = False, in_channels: int = 3):
    """A T2IAdapter for the tiny SD UNet (``full_adapter``: features at 1/8 and 1/16 of the image) or
    the tiny SDXL UNet (``full_adapter_xl`` at 1/16: the first feature goes after the DownBlock2D,
    the second into the cross-attention block; the XL adapter's last two, at 1/32, fit nowhere in
    this two-block UNet and are dropped, as diffusers does)."""
    import torch
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    if sdxl:
        ad = T2IAdapter(in_channels=in_channels, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=16,
                        adapter_type="full_adapter_xl")
    else:
        ad = T2IAdapter(in_channels=in_channels, channels=[32, 64], num_res_blocks=1, downscale_factor=8,
                        adapter_type="full_adapter")
    return ad.eval()


def save_tiny_controlnet(out_dir: str | Path, unet, seed: int = 11) -> Path:
    """``save_pretrained`` a tiny ControlNet (what ``--controlnet DIR`` reads)."""
    out_dir = Path(out_dir)
    tiny_controlnet(unet, seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def save_tiny_adapter(out_dir: str | Path, seed: int = 21, **kw) -> Path:
    """``save_pretrained`` a tiny T2I-Adapter (what ``--adapter DIR`` reads)."""
    out_dir = Path(out_dir)
    tiny_adapter(seed, **kw).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
