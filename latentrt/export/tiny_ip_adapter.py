"""Tiny random IP-Adapters saved as the published checkpoints are (tests).

:func:`save_tiny_ip_adapter` writes, for a given UNet, a ``.safetensors`` file in the original IP-Adapter
layout that diffusers' ``load_ip_adapter`` reads (``image_proj.*``: the image projection, ``ip_adapter.N.to_k_ip
/ to_v_ip``: one pair per cross-attention layer, numbered 1, 3, 5, ... in the UNet's processor order) and
next to it an ``image_encoder/`` folder with a tiny random ``CLIPVisionModelWithProjection`` (where
``load_ip_adapter`` looks for it, as in h94/IP-Adapter's ``models/`` folder). ``plus=True`` writes the
Resampler ("plus") projection, which reads the encoder's penultimate hidden states.
"""

from __future__ import annotations

from pathlib import Path

#: a small CLIP vision tower: 32x32 pixels in 8x8 patches (17 tokens), 48 wide, 24-dim projection
TINY_VISION = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu")


def tiny_image_encoder(seed: int = 30, **overrides):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_VISION, **overrides})).eval()


def _cross_attention_sizes(unet) -> list[int]:
    """The hidden size of every cross-attention processor, in ``unet.attn_processors`` order (diffusers'
    ``_convert_ip_adapter_attn_to_diffusers``)."""
    c, out = unet.config, []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            out.append(int(c.block_out_channels[-1]))
        elif name.startswith("up_blocks"):
            out.append(int(list(reversed(c.block_out_channels))[int(name[len("up_blocks.")])]))
        else:
            out.append(int(c.block_out_channels[int(name[len("down_blocks.")])]))
    return out


def tiny_ip_adapter_state_dict(unet, image_encoder, *, plus: bool = False, seed: int = 31, scale: float = 0.5,
                               num_tokens: int = 4, plus_width: int = 64) -> dict:
    """The flat state dict of the original IP-Adapter format (``image_proj.*`` and ``ip_adapter.*``);
    ``plus_width``: the Resampler's width (a multiple of its 64-wide heads; 768 in ip-adapter-plus_sd15)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=scale):
        return (torch.randn(*shape, generator=g) * s).contiguous()

    cross = int(unet.config.cross_attention_dim)
    sd = {}
    if not plus:  # ImageProjection: Linear(projection_dim -> 4 x cross) + LayerNorm(cross)
        d = int(image_encoder.config.projection_dim)
        sd.update({"image_proj.proj.weight": rnd(cross * 4, d), "image_proj.proj.bias": rnd(cross * 4),
                   "image_proj.norm.weight": 1 + rnd(cross, s=0.1), "image_proj.norm.bias": rnd(cross, s=0.1)})
    else:  # the Resampler: 4 perceiver blocks, 64-wide heads (diffusers reads heads from to_q / 64)
        emb, hid, mult = int(image_encoder.config.hidden_size), int(plus_width), 4
        sd.update({"image_proj.latents": rnd(1, num_tokens, hid), "image_proj.proj_in.weight": rnd(hid, emb, s=0.2),
                   "image_proj.proj_in.bias": rnd(hid, s=0.1), "image_proj.proj_out.weight": rnd(cross, hid, s=0.2),
                   "image_proj.proj_out.bias": rnd(cross, s=0.1), "image_proj.norm_out.weight": 1 + rnd(cross, s=0.1),
                   "image_proj.norm_out.bias": rnd(cross, s=0.1)})
        for i in range(4):
            p = f"image_proj.layers.{i}."
            for n in ("0.norm1", "0.norm2", "1.0"):
                sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + rnd(hid, s=0.1), rnd(hid, s=0.1)
            sd.update({p + "0.to_q.weight": rnd(hid, hid, s=0.2), p + "0.to_kv.weight": rnd(2 * hid, hid, s=0.2),
                       p + "0.to_out.weight": rnd(hid, hid, s=0.2), p + "1.1.weight": rnd(hid * mult, hid, s=0.2),
                       p + "1.3.weight": rnd(hid, hid * mult, s=0.2)})
    for k, hidden in enumerate(_cross_attention_sizes(unet)):
        key = 2 * k + 1
        sd[f"ip_adapter.{key}.to_k_ip.weight"] = rnd(hidden, cross)
        sd[f"ip_adapter.{key}.to_v_ip.weight"] = rnd(hidden, cross)
    return sd


def save_tiny_ip_adapter(folder: str | Path, unet, *, plus: bool = False, seed: int = 31,
                         name: str | None = None, image_encoder=None) -> Path:
    """Write ``folder/NAME.safetensors`` and ``folder/image_encoder/``; returns the weight file's path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    enc = image_encoder if image_encoder is not None else tiny_image_encoder(seed + 100)
    enc.save_pretrained(str(folder / "image_encoder"))
    path = folder / (name or ("ip-adapter-plus_tiny.safetensors" if plus else "ip-adapter_tiny.safetensors"))
    save_file(tiny_ip_adapter_state_dict(unet, enc, plus=plus, seed=seed), str(path))
    return path
