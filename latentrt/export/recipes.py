"""What to export for each pipeline kind: its constants and its components.

A recipe turns a loaded diffusers pipeline into (spec, torch module, dummy value ranges) per
component plus the constants the runtime needs. New pipeline kinds register a recipe in
:data:`RECIPES`; :func:`detect_kind` picks one from the loaded pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .. import components as C
from .wrappers import TextEncoderWrapper, UNetWrapper, VaeDecoderWrapper, VaeEncoderWrapper


@dataclass
class ComponentPlan:
    spec: C.ComponentSpec
    module: object  # torch.nn.Module
    value_ranges: dict = field(default_factory=dict)


@dataclass
class Recipe:
    kind: str
    detect: Callable  # (pipe) -> bool
    constants: Callable  # (pipe) -> dict
    components: Callable  # (pipe, constants) -> list[ComponentPlan]


class UnsupportedModelError(ValueError):
    pass


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def sd_constants(pipe) -> dict:
    """Constants shared by the SD-family pipelines (text encoder + UNet + AutoencoderKL)."""
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    f = vae_scale_factor(vae)
    return {
        "vae_scale_factor": f,
        "vae_scaling_factor": float(vae.config.scaling_factor),
        "vae_shift_factor": getattr(vae.config, "shift_factor", None),
        "latent_channels": int(vae.config.latent_channels),
        "image_channels": int(vae.config.in_channels),
        "unet_in_channels": int(unet.config.in_channels),
        "unet_out_channels": int(unet.config.out_channels),
        "unet_sample_size": int(unet.config.sample_size),
        "default_height": int(unet.config.sample_size) * f,
        "default_width": int(unet.config.sample_size) * f,
        # spatial sizes must divide by this for the UNet's down/up sampling to round-trip
        "size_multiple": f * 2 ** (len(unet.config.block_out_channels) - 1),
        "time_cond_proj_dim": unet.config.time_cond_proj_dim,
        "cross_attention_dim": int(unet.config.cross_attention_dim),
        "seq_len": int(tok.model_max_length),
        "text_hidden_size": int(te.config.hidden_size),
        "text_num_layers": int(te.config.num_hidden_layers),
        "vocab_size": int(te.config.vocab_size),
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
    }


def sd_components(pipe, k: dict, *, unet_extra: dict | None = None) -> list[ComponentPlan]:
    """Text encoder, UNet, VAE encoder and decoder of an SD-family pipeline."""
    f = k["vae_scale_factor"]
    te_spec = C.text_encoder_spec(seq_len=k["seq_len"], hidden_size=k["text_hidden_size"],
                                  num_layers=k["text_num_layers"])
    unet_spec = C.unet_spec(
        in_channels=k["unet_in_channels"], out_channels=k["unet_out_channels"], vae_scale_factor=f,
        seq_len=k["seq_len"], cross_attention_dim=k["cross_attention_dim"],
        time_cond_proj_dim=k.get("time_cond_proj_dim"), **(unet_extra or {}),
    )
    enc_spec = C.vae_encoder_spec(in_channels=k["image_channels"], latent_channels=k["latent_channels"],
                                  vae_scale_factor=f)
    dec_spec = C.vae_decoder_spec(out_channels=k["image_channels"], latent_channels=k["latent_channels"],
                                  vae_scale_factor=f)
    vocab = k["vocab_size"]
    return [
        ComponentPlan(te_spec, TextEncoderWrapper(pipe.text_encoder), {"input_ids": (0, vocab)}),
        ComponentPlan(unet_spec, UNetWrapper(pipe.unet, [s.name for s in unet_spec.inputs]),
                      {"timestep": (0, 999), "timestep_cond": (-1, 1)}),
        ComponentPlan(enc_spec, VaeEncoderWrapper(pipe.vae), {"sample": (-1, 1)}),
        ComponentPlan(dec_spec, VaeDecoderWrapper(pipe.vae)),
    ]


def _is_lcm(pipe) -> bool:
    unet = getattr(pipe, "unet", None)
    return unet is not None and bool(getattr(unet.config, "time_cond_proj_dim", None)) and hasattr(pipe, "vae")


LCM = Recipe("lcm", _is_lcm, sd_constants, sd_components)

#: checked in order; the first whose ``detect`` accepts the pipeline is used
RECIPES: list[Recipe] = [LCM]


def detect_kind(pipe) -> Recipe:
    for r in RECIPES:
        if r.detect(pipe):
            return r
    unet = getattr(pipe, "unet", None)
    if unet is not None and not getattr(unet.config, "time_cond_proj_dim", None):
        raise UnsupportedModelError(
            f"{type(pipe).__name__}: this UNet has no time_cond_proj_dim (no LCM guidance embedding), so it is "
            "not a Latent Consistency Model; export an LCM checkpoint (for example SimianLuo/LCM_Dreamshaper_v7)"
        )
    raise UnsupportedModelError(f"{type(pipe).__name__}: no export recipe for this pipeline; supported: "
                                f"{', '.join(r.kind for r in RECIPES)}")
