"""Tiny, randomly initialised, deterministic pipelines built in code (tests and the demo).

They have the real architectures' structure (UNet2DConditionModel with ``time_cond_proj_dim``,
AutoencoderKL with a x8 latent factor, CLIPTextModel with the real 49408-token BPE vocabulary) at a
size that exports and runs in seconds, and are saved as normal diffusers folders so every code
path that loads a hub checkpoint is exercised without a network.
"""

from __future__ import annotations

from pathlib import Path

from .vocab import write_clip_tokenizer

TINY_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=49407, projection_dim=32, layer_norm_eps=1e-5, hidden_act="quick_gelu",
)

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64, scaling_factor=0.18215,
)

SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon",
)


def tiny_unet_config(*, time_cond_proj_dim: int | None = 32, cross_attention_dim: int = 32, **overrides) -> dict:
    cfg = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    cfg.update(overrides)
    return cfg


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def tiny_text_encoder(seed: int = 1, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(seed)
    return CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, **overrides})).eval()


def tiny_vae(seed: int = 2, **overrides):
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(**{**TINY_VAE, **overrides}).eval()


def tiny_unet(seed: int = 3, **config):
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(**tiny_unet_config(**config)).eval()


def tiny_tokenizer(tmp_dir: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_dir, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(str(tmp_dir))


def tiny_lcm_pipeline(seed: int = 0):
    """An in-memory ``LatentConsistencyModelPipeline`` with tiny random weights."""
    import tempfile

    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
    return LatentConsistencyModelPipeline(
        vae=tiny_vae(seed + 2),
        text_encoder=tiny_text_encoder(seed + 1),
        tokenizer=tokenizer,
        unet=tiny_unet(seed + 3),
        scheduler=LCMScheduler(**SD15_SCHEDULER, original_inference_steps=50),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_lcm(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny LCM pipeline and ``save_pretrained`` it as a normal diffusers folder."""
    out_dir = Path(out_dir)
    tiny_lcm_pipeline(seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
