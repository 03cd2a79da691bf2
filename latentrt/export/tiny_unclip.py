"""Tiny random Stable unCLIP pipelines (text-to-image through a prior, and image variations).

The component configs follow diffusers' own fast tests for ``StableUnCLIPPipeline`` and
``StableUnCLIPImg2ImgPipeline`` (32-wide CLIP embedder, a one-layer PriorTransformer, a UNet with
``class_embed_type="projection"`` over [image embedding, noise-level embedding], DDIM with
v-prediction), with the real 49408-token CLIP vocabulary (SD 2.x pads with ``"!"``, the Karlo prior
tokenizer with ``<|endoftext|>``). Unlike the test configs, the image normalizer's and the prior's
mean/std are random, not zeros/ones, so a runtime that forgets to apply them cannot pass parity.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .tiny import TINY_TEXT, _seeded, tiny_tokenizer, tiny_unet, tiny_vae

EMBED_DIM = 32  # CLIP projection dim = image embedding width

#: stabilityai/stable-diffusion-2-1-unclip(-small): prior_scheduler and image_noising_scheduler
PRIOR_SCHEDULER = dict(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                       clip_sample=True, clip_sample_range=5.0, beta_schedule="squaredcos_cap_v2")
NOISING_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2")
#: diffusers' fast-test decoder scheduler (DDIM, v-prediction)
UNCLIP_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1)
CLIP_IMAGE_SIZE = 32


def _randomize_stats(mean, std, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mean.copy_(torch.randn(mean.shape, generator=g) * 0.5)
        std.copy_(torch.rand(std.shape, generator=g) + 0.5)


def tiny_image_normalizer(seed: int = 20):
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    norm = StableUnCLIPImageNormalizer(embedding_dim=EMBED_DIM)
    _randomize_stats(norm.mean, norm.std, seed)
    return norm.eval()


def tiny_prior(seed: int = 21):
    from diffusers import PriorTransformer

    _seeded(seed)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM, num_layers=1)
    _randomize_stats(prior.clip_mean, prior.clip_std, seed + 100)
    return prior.eval()


def tiny_prior_text_encoder(seed: int = 22):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _seeded(seed)
    cfg = {**TINY_TEXT, "hidden_size": EMBED_DIM, "projection_dim": EMBED_DIM}
    return CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()


def tiny_image_encoder(seed: int = 23):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _seeded(seed)
    cfg = CLIPVisionConfig(hidden_size=EMBED_DIM, projection_dim=EMBED_DIM, num_hidden_layers=2,
                           num_attention_heads=4, image_size=CLIP_IMAGE_SIZE, intermediate_size=37, patch_size=4)
    return CLIPVisionModelWithProjection(cfg).eval()


def _decoder_components(seed: int) -> dict:
    """What both unCLIP pipelines share: normalizer, noising scheduler, SD text encoder, UNet, DDIM, VAE."""
    from diffusers import DDIMScheduler, DDPMScheduler

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp), pad_token="!")
    from .tiny import tiny_text_encoder

    return dict(
        image_normalizer=tiny_image_normalizer(seed + 20),
        image_noising_scheduler=DDPMScheduler(**NOISING_SCHEDULER),
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(seed + 1, hidden_act="gelu", pad_token_id=0),
        unet=tiny_unet(seed + 3, time_cond_proj_dim=None, class_embed_type="projection",
                       projection_class_embeddings_input_dim=2 * EMBED_DIM, use_linear_projection=True,
                       upcast_attention=True),
        scheduler=DDIMScheduler(**UNCLIP_SCHEDULER),
        vae=tiny_vae(seed + 2),
    )


def tiny_unclip_pipeline(seed: int = 0):
    """An in-memory ``StableUnCLIPPipeline`` (text -> prior -> image embedding -> image)."""
    from diffusers import DDPMScheduler, StableUnCLIPPipeline

    with tempfile.TemporaryDirectory() as tmp:
        prior_tokenizer = tiny_tokenizer(Path(tmp))
    return StableUnCLIPPipeline(
        prior_tokenizer=prior_tokenizer,
        prior_text_encoder=tiny_prior_text_encoder(seed + 22),
        prior=tiny_prior(seed + 21),
        prior_scheduler=DDPMScheduler(**PRIOR_SCHEDULER),
        **_decoder_components(seed),
    )


def tiny_unclip_img2img_pipeline(seed: int = 0):
    """An in-memory ``StableUnCLIPImg2ImgPipeline`` (image variations through a CLIP vision encoder)."""
    from diffusers import StableUnCLIPImg2ImgPipeline
    from transformers import CLIPImageProcessor

    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=CLIP_IMAGE_SIZE, size=CLIP_IMAGE_SIZE),
        image_encoder=tiny_image_encoder(seed + 23),
        **_decoder_components(seed),
    )


def save_tiny_unclip(out_dir: str | Path, seed: int = 0, *, img2img: bool = False) -> Path:
    """Build a tiny unCLIP pipeline (text-to-image, or image variation with ``img2img``) and
    ``save_pretrained`` it as a normal diffusers folder."""
    out_dir = Path(out_dir)
    pipe = tiny_unclip_img2img_pipeline(seed) if img2img else tiny_unclip_pipeline(seed)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
