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
    # (pipe, bundle_root) -> dict merged into the manifest's extra: files beyond the tokenizer and
    # scheduler that the runtime needs (unCLIP's prior scheduler, embedding statistics, ...)
    support_files: Callable | None = None


class UnsupportedModelError(ValueError):
    pass


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_tile_constants(vae) -> dict:
    """The tiling attributes diffusers derives from an AutoencoderKL's config (``tile_sample_min_size`` is
    ``sample_size``, the latent tile that over the VAE's downsampling, overlap 0.25), for
    :mod:`latentrt.runtime.vae_tiling`; {} for VAEs without tiling."""
    if vae is None or not hasattr(vae, "tile_latent_min_size"):
        return {}
    sample = vae.tile_sample_min_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return {"vae_tile_sample_min_size": int(sample), "vae_tile_latent_min_size": int(vae.tile_latent_min_size),
            "vae_tile_overlap_factor": float(vae.tile_overlap_factor)}


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
        # every multiple of the VAE factor: the UNet graph takes its upsample sizes from the skip tensors
        # (wrappers.explicit_upsample_sizes), as diffusers does for sizes its UNet does not divide; the
        # smallest side leaves one latent at the UNet's lowest level (latentrt.sizes)
        "size_multiple": f,
        "min_size": f * 2 ** (len(unet.config.block_out_channels) - 1),
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
        c = unet.config
        raise UnsupportedModelError(
            f"{type(pipe).__name__}: this UNet has no time_cond_proj_dim (not an LCM) and is not a plain SD1.x/SD2.x "
            f"text-to-image UNet either (in_channels={c.in_channels}, class_embed_type="
            f"{getattr(c, 'class_embed_type', None)}, addition_embed_type={getattr(c, 'addition_embed_type', None)}); "
            f"supported kinds: {', '.join(r.kind for r in RECIPES)}"
        )
    raise UnsupportedModelError(f"{type(pipe).__name__}: no export recipe for this pipeline; supported: "
                                f"{', '.join(r.kind for r in RECIPES)}")


# -- latent x2 upscaler (StableDiffusionLatentUpscalePipeline) -------------------------------------

#: default largest *input* side in pixels a latent-upscaler bundle accepts (its output: twice that)
LATENT_UPSCALE_MAX_SIZE = 1024
#: diffusers' pipeline hard-codes the noise-level embedding as ones(64) + zeros(64)
NOISE_LEVEL_EMBED_DIM = 128


def _is_latent_upscaler(pipe) -> bool:
    """The pipeline class, or a K-UNet (Fourier time embedding, K-blocks) that takes the noisy latents
    concatenated with the low-res latents (``in_channels`` = 2 x latent channels)."""
    if type(pipe).__name__ == "StableDiffusionLatentUpscalePipeline":
        return True
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if unet is None or vae is None:
        return False
    c = unet.config
    return (getattr(c, "time_embedding_type", None) == "fourier"
            and str(c.down_block_types[0]).startswith("K")
            and int(c.in_channels) == 2 * int(vae.config.latent_channels))


def latent_upscale_constants(pipe, *, max_size: int = LATENT_UPSCALE_MAX_SIZE) -> dict:
    """Sizes (``default_*``, ``size_multiple``, ``min_size``, ``max_size``) are *input* pixels; the
    output is ``upscale_factor`` times larger. The K-UNet downsamples its latents
    ``2**(blocks-1)`` times and its reflect padding needs at least 2 latents at the bottom."""
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    f = vae_scale_factor(vae)
    latent_channels = int(vae.config.latent_channels)
    hidden = int(te.config.hidden_size)
    tcond = unet.config.time_cond_proj_dim
    if tcond is None or int(tcond) != NOISE_LEVEL_EMBED_DIM + hidden:
        raise UnsupportedModelError(
            f"latent upscaler: unet.time_cond_proj_dim={tcond} but the pipeline feeds {NOISE_LEVEL_EMBED_DIM} "
            f"(noise-level embedding) + {hidden} (text pooler output) = {NOISE_LEVEL_EMBED_DIM + hidden}")
    if int(unet.config.out_channels) != latent_channels + 1:
        raise UnsupportedModelError(
            f"latent upscaler: unet.out_channels={unet.config.out_channels}, expected latents + a variance "
            f"channel = {latent_channels + 1}")
    out_multiple = 2 ** (len(unet.config.block_out_channels) - 1)  # output latents, per side
    size_multiple = f * out_multiple // 2
    min_size = 2 * size_multiple
    if max_size % size_multiple or max_size < min_size:
        raise ValueError(f"max_size={max_size} must be a multiple of {size_multiple} and at least {min_size}")
    default = int(getattr(vae.config, "sample_size", 0) or 512)
    default = min(max(default - default % size_multiple, min_size), max_size)
    return {
        "vae_scale_factor": f,
        "vae_scaling_factor": float(vae.config.scaling_factor),
        "latent_channels": latent_channels,
        "image_channels": int(vae.config.in_channels),
        "unet_in_channels": int(unet.config.in_channels),
        "unet_out_channels": int(unet.config.out_channels),
        "upscale_factor": 2,
        "sizes_are": "input pixels (the output is upscale_factor times larger)",
        "default_height": default,
        "default_width": default,
        "size_multiple": size_multiple,
        "min_size": min_size,
        "max_size": int(max_size),
        "time_cond_proj_dim": int(tcond),
        "noise_level_embed_dim": NOISE_LEVEL_EMBED_DIM,
        "noise_level": 0.0,
        "cross_attention_dim": int(unet.config.cross_attention_dim),
        "seq_len": int(tok.model_max_length),
        "text_hidden_size": hidden,
        "text_num_layers": int(te.config.num_hidden_layers),
        "vocab_size": int(te.config.vocab_size),
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
    }


def latent_upscale_components(pipe, k: dict) -> list[ComponentPlan]:
    """Text encoder (with the pre-norm last hidden state), K-UNet, VAE encoder, VAE decoder at 2x."""
    from .wrappers import TextEncoderPrenormWrapper, make_k_resamplers_exportable

    f = k["vae_scale_factor"]
    te_spec = C.text_encoder_prenorm_spec(seq_len=k["seq_len"], hidden_size=k["text_hidden_size"],
                                          num_layers=k["text_num_layers"])
    unet_spec = C.upscaler_unet_spec(
        in_channels=k["unet_in_channels"], out_channels=k["unet_out_channels"], vae_scale_factor=f,
        seq_len=k["seq_len"], cross_attention_dim=k["cross_attention_dim"],
        time_cond_proj_dim=k["time_cond_proj_dim"])
    enc_spec = C.vae_encoder_spec(in_channels=k["image_channels"], latent_channels=k["latent_channels"],
                                  vae_scale_factor=f)
    dec_spec = C.upscaler_vae_decoder_spec(out_channels=k["image_channels"], latent_channels=k["latent_channels"],
                                           vae_scale_factor=f)
    return [
        ComponentPlan(te_spec, TextEncoderPrenormWrapper(pipe.text_encoder), {"input_ids": (0, k["vocab_size"])}),
        # the K-blocks' resamplers are swapped (in place) for numerically equal, traceable ones
        ComponentPlan(unet_spec, UNetWrapper(make_k_resamplers_exportable(pipe.unet),
                                             [s.name for s in unet_spec.inputs]),
                      {"timestep": (-1, 1), "timestep_cond": (-1, 1)}),
        ComponentPlan(enc_spec, VaeEncoderWrapper(pipe.vae), {"sample": (-1, 1)}),
        ComponentPlan(dec_spec, VaeDecoderWrapper(pipe.vae)),
    ]


LATENT_UPSCALE = Recipe("latent_upscale", _is_latent_upscaler, latent_upscale_constants, latent_upscale_components)
RECIPES.insert(0, LATENT_UPSCALE)  # before LCM: the upscaler's UNet also has a time_cond_proj_dim


# -- SDXL (StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline; LCM-SDXL, SSD-1B, fused LoRAs)


def _is_sdxl(pipe) -> bool:
    """Two text encoders and a UNet with SDXL's added ``text_time`` conditioning."""
    unet = getattr(pipe, "unet", None)
    return (unet is not None and getattr(pipe, "text_encoder_2", None) is not None and hasattr(pipe, "vae")
            and getattr(unet.config, "addition_embed_type", None) == "text_time")


def sdxl_constants(pipe) -> dict:
    """:func:`sd_constants` of the first text encoder plus the second encoder and the added conditioning.

    ``time_ids_dim`` is what the UNet's ``add_embedding`` takes beyond the pooled text embedding, divided
    by ``addition_time_embed_dim``: 6 for (original size, crop top-left, target size), 5 for the
    refiner-style (original size, crop top-left, aesthetic score) when ``requires_aesthetics_score``.
    """
    unet, vae, te2, tok2 = pipe.unet, pipe.vae, pipe.text_encoder_2, pipe.tokenizer_2
    if getattr(pipe, "text_encoder", None) is None:
        raise UnsupportedModelError(f"{type(pipe).__name__}: SDXL pipelines without the first text encoder "
                                    "(the SDXL refiner) are not supported yet; export the SDXL base, LCM-SDXL or SSD-1B")
    if getattr(vae.config, "latents_mean", None) is not None:
        raise UnsupportedModelError("this VAE normalises latents with latents_mean / latents_std, which the "
                                    "latentrt SDXL runtime does not implement yet")
    k = sd_constants(pipe)
    proj = int(te2.config.projection_dim)
    time_dim = int(unet.config.addition_time_embed_dim)
    add_in = int(unet.add_embedding.linear_1.in_features)
    if (add_in - proj) % time_dim or (add_in - proj) // time_dim not in (5, 6):
        raise UnsupportedModelError(
            f"SDXL UNet: add_embedding takes {add_in} features, which is not text_encoder_2.projection_dim ({proj}) "
            f"+ 5 or 6 x addition_time_embed_dim ({time_dim}); check unet.config.projection_class_embeddings_input_dim")
    config = getattr(pipe, "config", {}) or {}
    k.update({
        "seq_len_2": int(tok2.model_max_length),
        "text_hidden_size_2": int(te2.config.hidden_size),
        "text_num_layers_2": int(te2.config.num_hidden_layers),
        "vocab_size_2": int(te2.config.vocab_size),
        "text_projection_dim": proj,
        "addition_time_embed_dim": time_dim,
        "time_ids_dim": (add_in - proj) // time_dim,
        "requires_aesthetics_score": bool(config.get("requires_aesthetics_score", False)),
        "force_zeros_for_empty_prompt": bool(config.get("force_zeros_for_empty_prompt", True)),
        # diffusers runs an fp16 VAE with force_upcast in fp32; here the bundle's per-component precision
        # decides (export with component_precision={"vae_decoder": "fp32", "vae_encoder": "fp32"})
        "vae_force_upcast": bool(getattr(vae.config, "force_upcast", False)),
        "is_lcm": bool(unet.config.time_cond_proj_dim),
    })
    if k["seq_len_2"] != k["seq_len"]:
        raise UnsupportedModelError(f"SDXL: the two tokenizers have different lengths ({k['seq_len']} and "
                                    f"{k['seq_len_2']}); their hidden states are concatenated token by token")
    if k["text_hidden_size"] + k["text_hidden_size_2"] != k["cross_attention_dim"]:
        raise UnsupportedModelError(
            f"SDXL: the text encoders' widths {k['text_hidden_size']} + {k['text_hidden_size_2']} do not add up to "
            f"the UNet's cross_attention_dim {k['cross_attention_dim']}")
    return k


def sdxl_components(pipe, k: dict) -> list[ComponentPlan]:
    """Both text encoders, the SDXL UNet, VAE encoder and decoder."""
    from .wrappers import SDXLTextEncoderWrapper, SDXLUNetWrapper

    f = k["vae_scale_factor"]
    te1 = C.sdxl_text_encoder_spec(seq_len=k["seq_len"], hidden_size=k["text_hidden_size"],
                                   num_layers=k["text_num_layers"], name="text_encoder")
    te2 = C.sdxl_text_encoder_spec(seq_len=k["seq_len_2"], hidden_size=k["text_hidden_size_2"],
                                   num_layers=k["text_num_layers_2"], projection_dim=k["text_projection_dim"],
                                   name="text_encoder_2")
    unet = C.sdxl_unet_spec(
        in_channels=k["unet_in_channels"], out_channels=k["unet_out_channels"], vae_scale_factor=f,
        seq_len=k["seq_len"], cross_attention_dim=k["cross_attention_dim"], text_embeds_dim=k["text_projection_dim"],
        time_ids_dim=k["time_ids_dim"], time_cond_proj_dim=k.get("time_cond_proj_dim"))
    enc = C.vae_encoder_spec(in_channels=k["image_channels"], latent_channels=k["latent_channels"], vae_scale_factor=f)
    dec = C.vae_decoder_spec(out_channels=k["image_channels"], latent_channels=k["latent_channels"], vae_scale_factor=f)
    return [
        ComponentPlan(te1, SDXLTextEncoderWrapper(pipe.text_encoder, False), {"input_ids": (0, k["vocab_size"])}),
        ComponentPlan(te2, SDXLTextEncoderWrapper(pipe.text_encoder_2, True), {"input_ids": (0, k["vocab_size_2"])}),
        ComponentPlan(unet, SDXLUNetWrapper(pipe.unet, [s.name for s in unet.inputs]),
                      {"timestep": (0, 999), "timestep_cond": (-1, 1), "time_ids": (0, 1024)}),
        ComponentPlan(enc, VaeEncoderWrapper(pipe.vae), {"sample": (-1, 1)}),
        ComponentPlan(dec, VaeDecoderWrapper(pipe.vae)),
    ]


SDXL = Recipe("sdxl", _is_sdxl, sdxl_constants, sdxl_components)
RECIPES.insert(0, SDXL)  # before LCM / SD: LCM-SDXL UNets also have a time_cond_proj_dim


# -- Stable unCLIP (issue 5): detected by pipeline class, before the generic recipes ---------------
from .unclip_recipe import UNCLIP, UNCLIP_IMG2IMG  # noqa: E402

RECIPES[:0] = [UNCLIP, UNCLIP_IMG2IMG]


# -- plain Stable Diffusion 1.x / 2.x (issue 3): epsilon or v-prediction, CFG by batch doubling ----


def _is_sd(pipe) -> bool:
    """A CLIP text encoder + a plain text-to-image UNet (no LCM guidance embedding, no class or added
    conditioning, latents in = latents out) + AutoencoderKL: SD1.x, SD2.x and their fine-tunes."""
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if unet is None or vae is None or getattr(pipe, "text_encoder", None) is None:
        return False
    c = unet.config
    return (not getattr(c, "time_cond_proj_dim", None) and getattr(pipe, "text_encoder_2", None) is None
            and int(c.in_channels) == int(vae.config.latent_channels)
            and getattr(c, "class_embed_type", None) is None and getattr(c, "addition_embed_type", None) is None
            and getattr(c, "num_class_embeds", None) is None
            and getattr(c, "time_embedding_type", "positional") == "positional")


SD = Recipe("sd", _is_sd, sd_constants, sd_components)
RECIPES.append(SD)  # last: the most generic recipe
