"""Write a diffusers SD 1.x pipeline's weights as an original (LDM / A1111) single-file checkpoint.

For tests of single-file export: the inverse of diffusers' ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint`` and ``convert_ldm_clip_checkpoint`` (key names of CompVis'
``model.diffusion_model.*``, ``first_stage_model.*`` and ``cond_stage_model.transformer.*``), for any
number of UNet levels and ``layers_per_block``.
"""

from __future__ import annotations

from pathlib import Path

UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(name: str, table: dict) -> str:
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def unet_block_map(config) -> dict[str, str]:
    """diffusers UNet module prefixes -> LDM ones."""
    n, per = len(config.block_out_channels), config.layers_per_block
    out = {}
    for i in range(n):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
        has_attn = config.up_block_types[i].startswith("CrossAttn")
        for j in range(per + 1):
            k = i * (per + 1) + j
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        if i < n - 1:
            out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (per + 1) + per}.{2 if has_attn else 1}"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.resnets.1"] = "middle_block.2"
    return out


def unet_to_ldm(unet) -> dict:
    blocks = unet_block_map(unet.config)
    out = {}
    for name, w in unet.state_dict().items():
        new = _rename(name, UNET_TOP)
        for old, ldm in sorted(blocks.items(), key=lambda kv: -len(kv[0])):
            if name.startswith(old + "."):
                rest = name[len(old) + 1:]
                new = f"{ldm}.{_rename(rest, UNET_RESNET) if '.resnets.' in old + '.' else rest}"
                break
        out["model.diffusion_model." + new] = w
    return out


def vae_to_ldm(vae) -> dict:
    n = len(vae.config.block_out_channels)
    table = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out",
             "encoder.mid_block.attentions.0": "encoder.mid.attn_1", "decoder.mid_block.attentions.0": "decoder.mid.attn_1"}
    for side in ("encoder", "decoder"):
        for j in range(2):
            table[f"{side}.mid_block.resnets.{j}"] = f"{side}.mid.block_{j + 1}"
    for i in range(n):
        for j in range(vae.config.layers_per_block + 1):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        table[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        table[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"
    out = {}
    for name, w in vae.state_dict().items():
        new = name
        for old, ldm in sorted(table.items(), key=lambda kv: -len(kv[0])):
            if name.startswith(old + "."):
                rest = name[len(old) + 1:]
                if "attn_1" in ldm:
                    rest = _rename(rest, VAE_ATTENTION)
                    w = w[:, :, None, None] if w.ndim == 2 else w  # LDM attention projections are 1x1 convs
                elif ".block" in ldm:
                    rest = _rename(rest, VAE_RESNET)
                new = f"{ldm}.{rest}"
                break
        out["first_stage_model." + new] = w
    return out


def clip_to_ldm(text_encoder) -> dict:
    out = {}
    for name, w in text_encoder.state_dict().items():
        name = name if name.startswith("text_model.") else "text_model." + name
        out["cond_stage_model.transformer." + name] = w
    return out


def save_ldm_checkpoint(pipe, path: str | Path) -> Path:
    """``pipe``'s UNet, VAE and text encoder as one LDM-keyed ``.safetensors`` file."""
    from safetensors.torch import save_file

    sd = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_to_ldm(pipe.text_encoder)}
    path = Path(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
