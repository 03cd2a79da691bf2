"""Full-size benchmark architectures of the seed pipelines (issue 18, item 6), random weights, from the
published configs (nothing is downloaded):

* ``sd-x2-upscaler``: ``stabilityai/sd-x2-latent-upscaler`` (``StableDiffusionLatentUpscalePipeline``):
  the K-UNet of Katherine Crowson's k-diffusion latent upscaler (depths 4/4/4/4, channels
  384/384/768/768, self-attention only in the deepest block, cross-attention 768, mapping condition
  896 = 128 noise-level + 768 pooled text), the CLIP ViT-L/14 text encoder, the SD VAE and the
  Euler discrete scheduler predicting the clean sample;
* ``sd21-unclip-l``: text-to-image through a prior (``StableUnCLIPPipeline``), as diffusers documents
  it: ``kakaobrain/karlo-v1-alpha``'s prior (PriorTransformer, 20 layers of 32 x 64 heads, and its CLIP
  ViT-L/14 text encoder with projection) in front of ``stabilityai/stable-diffusion-2-1-unclip-small``'s
  decoder (the SD 2.1 UNet with a ``projection`` class embedding of 2 x 768, the OpenCLIP ViT-H text
  encoder, the SD VAE, DDIM with v-prediction, the image normalizer and noising scheduler). "small"
  is the ViT-L variant, whose 768-wide image embeddings are what karlo's prior predicts;
* ``sd21-unclip-l-img2img``: image variations (``StableUnCLIPImg2ImgPipeline``): the very layout of
  ``stable-diffusion-2-1-unclip-small``: its CLIP ViT-L/14 vision encoder with projection and CLIP's
  224-pixel image processor in front of the same decoder.

The two unCLIP folders are separate because a bundle's pipeline kind is its folder's class (one
``model_index.json``); their decoders are built in the same order with the same seeds, so they are the
same weights. Writers build one component at a time and free it (the prior alone is 4 GB in fp32).
The tests count parameters on the meta device (:func:`count_parameters`) against the published counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

#: stabilityai/sd-x2-latent-upscaler unet/config.json (k-diffusion's upscaler config, in diffusers' terms)
X2_UPSCALER_UNET = dict(
    sample_size=64, in_channels=8, out_channels=5, act_fn="gelu", attention_head_dim=64, norm_num_groups=None,
    block_out_channels=(384, 384, 768, 768), layers_per_block=4, time_cond_proj_dim=896, conv_in_kernel=1,
    conv_out_kernel=1, cross_attention_dim=768, mid_block_type=None, only_cross_attention=False,
    down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
    up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
    resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
)

#: stabilityai/stable-diffusion-2-1-unclip-small unet/config.json: SD 2.1 (768-v) plus the class embedding
UNCLIP_SMALL_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, upcast_attention=True, class_embed_type="projection",
    projection_class_embeddings_input_dim=1536,
)

#: the SD 2.x text encoder (OpenCLIP ViT-H/14 text tower, 23 layers as SD uses it)
OPENCLIP_H_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

#: openai/clip-vit-large-patch14's vision tower with its projection (the unclip-small image encoder)
CLIP_VIT_L14_VISION = dict(
    hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

#: kakaobrain/karlo-v1-alpha prior/config.json (diffusers' PriorTransformer defaults are these)
KARLO_PRIOR = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                   num_embeddings=77, additional_embeddings=4, dropout=0.0)

#: image embedding width (CLIP ViT-L/14 projection): the normalizer's and the prior's
UNCLIP_EMBED_DIM = 768

#: published parameter counts (tests/bench/test_seed_models.py checks the configs against them)
PUBLISHED_PARAMETERS = {
    # SD 2.x UNet (stabilityai/stable-diffusion-2-1) + TimestepEmbedding(1536 -> 1280) class embedding
    ("unet", "UNCLIP_SMALL_UNET"): 865_910_724 + (1536 * 1280 + 1280) + (1280 * 1280 + 1280),
    ("text", "OPENCLIP_H_TEXT"): 340_387_840,
    ("text", "CLIP_VIT_L14_TEXT"): 123_060_480,
    # openai/clip-vit-large-patch14 has 427,616,513 = text + text projection + vision + projection + logit scale
    ("text_projection", "CLIP_VIT_L14_TEXT"): 123_060_480 + 768 * 768,
    ("vision_projection", "CLIP_VIT_L14_VISION"): 427_616_513 - (123_060_480 + 768 * 768) - 1,
    ("vae", "SD_VAE"): 83_653_863,
}


def count_parameters(kind: str, config: dict) -> int:
    """Parameters of one component built on the meta device (no memory): the SDXL kinds, plus
    ``k_unet`` (the upscaler's), ``prior``, ``vision_projection`` and ``text_projection``."""
    import torch

    from .sdxl_models import count_parameters as count_sdxl

    if kind not in ("prior", "vision_projection"):
        return count_sdxl("unet" if kind == "k_unet" else kind, config)
    with torch.device("meta"):
        if kind == "prior":
            from diffusers import PriorTransformer

            model = PriorTransformer(**config)
        else:
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    return sum(p.numel() for p in model.parameters())


def _index(cls: str, **components) -> dict:
    return {"_class_name": cls, "_diffusers_version": "0.42.1", **{k: list(v) for k, v in components.items()}}


def save_x2_upscaler(out: Path, progress: Callable[[str], None] = print) -> None:
    """The random-weight ``sd-x2-latent-upscaler`` folder, one component at a time."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..export.tiny import UPSCALER_SCHEDULER, tiny_tokenizer
    from .models import CLIP_VIT_L14_TEXT, SD_VAE, save_components

    out.mkdir(parents=True, exist_ok=True)
    save_components(out, [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT))),
        ("unet", lambda: UNet2DConditionModel(**X2_UPSCALER_UNET)),
        ("vae", lambda: AutoencoderKL(**SD_VAE)),
    ], progress)
    tiny_tokenizer(out / "tokenizer")
    EulerDiscreteScheduler(**UPSCALER_SCHEDULER).save_config(str(out / "scheduler"))
    index = _index("StableDiffusionLatentUpscalePipeline", scheduler=("diffusers", "EulerDiscreteScheduler"),
                   text_encoder=("transformers", "CLIPTextModel"), tokenizer=("transformers", "CLIPTokenizer"),
                   unet=("diffusers", "UNet2DConditionModel"), vae=("diffusers", "AutoencoderKL"))
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def _normalizer():
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    from ..export.tiny_unclip import _randomize_stats

    norm = StableUnCLIPImageNormalizer(embedding_dim=UNCLIP_EMBED_DIM)
    _randomize_stats(norm.mean, norm.std, 20)  # random statistics: a runtime that skips them cannot match
    return norm


def _prior():
    from diffusers import PriorTransformer

    from ..export.tiny_unclip import _randomize_stats

    prior = PriorTransformer(**KARLO_PRIOR)
    _randomize_stats(prior.clip_mean, prior.clip_std, 21)
    return prior


def save_unclip(out: Path, progress: Callable[[str], None] = print, *, img2img: bool = False) -> None:
    """A random-weight Stable unCLIP folder: text-to-image with karlo's prior, or (``img2img``) image
    variations with the CLIP vision encoder. The decoder comes first, so both get the same weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    from ..export.tiny import SD21_SCHEDULER, tiny_tokenizer
    from ..export.tiny_unclip import NOISING_SCHEDULER, PRIOR_SCHEDULER
    from .models import CLIP_VIT_L14_TEXT, SD_VAE, save_components

    out.mkdir(parents=True, exist_ok=True)
    steps = [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**OPENCLIP_H_TEXT))),
        ("unet", lambda: UNet2DConditionModel(**UNCLIP_SMALL_UNET)),
        ("vae", lambda: AutoencoderKL(**SD_VAE)),
        ("image_normalizer", _normalizer),
    ]
    if img2img:
        steps.append(("image_encoder", lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_VISION))))
    else:
        steps += [("prior_text_encoder", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_VIT_L14_TEXT))),
                  ("prior", _prior)]
    save_components(out, steps, progress)
    tiny_tokenizer(out / "tokenizer", pad_token="!")  # SD 2.x pads with "!"
    DDIMScheduler.from_config({k: v for k, v in SD21_SCHEDULER.items() if k != "skip_prk_steps"}).save_config(
        str(out / "scheduler"))
    DDPMScheduler(**NOISING_SCHEDULER).save_config(str(out / "image_noising_scheduler"))
    decoder = dict(
        image_normalizer=("stable_diffusion", "StableUnCLIPImageNormalizer"),
        image_noising_scheduler=("diffusers", "DDPMScheduler"), scheduler=("diffusers", "DDIMScheduler"),
        text_encoder=("transformers", "CLIPTextModel"), tokenizer=("transformers", "CLIPTokenizer"),
        unet=("diffusers", "UNet2DConditionModel"), vae=("diffusers", "AutoencoderKL"))
    if img2img:
        CLIPImageProcessor().save_pretrained(str(out / "feature_extractor"))  # 224 px, OpenAI CLIP mean/std
        index = _index("StableUnCLIPImg2ImgPipeline", feature_extractor=("transformers", "CLIPImageProcessor"),
                       image_encoder=("transformers", "CLIPVisionModelWithProjection"), **decoder)
    else:
        tiny_tokenizer(out / "prior_tokenizer")  # karlo's CLIP tokenizer pads with <|endoftext|>
        DDPMScheduler(**PRIOR_SCHEDULER).save_config(str(out / "prior_scheduler"))
        index = _index("StableUnCLIPPipeline", prior=("diffusers", "PriorTransformer"),
                       prior_scheduler=("diffusers", "DDPMScheduler"),
                       prior_text_encoder=("transformers", "CLIPTextModelWithProjection"),
                       prior_tokenizer=("transformers", "CLIPTokenizer"), **decoder)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


#: writers for ``latentrt.bench.models.MODELS`` (same signature: (out, progress))
SEED_MODELS: dict[str, Callable[[Path, Callable], None]] = {
    "sd-x2-upscaler": save_x2_upscaler,
    "sd21-unclip-l": save_unclip,
    "sd21-unclip-l-img2img": lambda out, progress=print: save_unclip(out, progress, img2img=True),
}
