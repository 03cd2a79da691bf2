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


#: a TAESD-shaped (diffusers ``AutoencoderTiny``) autoencoder at test size: x8 latents, 4 channels
TINY_TAESD = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
    act_fn="relu", upsampling_scaling_factor=2, latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0,
)


def tiny_taesd(seed: int = 4, **overrides):
    """A tiny random ``AutoencoderTiny`` (TAESD architecture, test size)."""
    from diffusers import AutoencoderTiny

    _seeded(seed)
    return AutoencoderTiny(**{**TINY_TAESD, **overrides}).eval()


def save_tiny_taesd(out_dir: str | Path, seed: int = 4) -> Path:
    """``save_pretrained`` the tiny TAESD as a normal diffusers folder (what ``--tiny-vae DIR`` reads)."""
    out_dir = Path(out_dir)
    tiny_taesd(seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------------------------------------
# plain Stable Diffusion (no LCM guidance embedding): SD1.5-style (epsilon, PNDM) and SD2-style
# (v-prediction, DDIM, pad token "!")

#: stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (without the version keys)
SD21_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    skip_prk_steps=True,
)


def tiny_sd_pipeline(seed: int = 0, *, v_prediction: bool = False):
    """An in-memory ``StableDiffusionPipeline`` with tiny random weights.

    ``v_prediction=False``: SD1.5-like (PNDMScheduler with skip_prk_steps, steps_offset=1,
    set_alpha_to_one=False; pad token ``<|endoftext|>``). ``v_prediction=True``: SD2.x-like
    (DDIMScheduler with prediction_type v_prediction, linear attention projections, gelu text
    encoder, pad token ``!``).
    """
    import tempfile

    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp), pad_token="!" if v_prediction else "<|endoftext|>")
    if v_prediction:
        scheduler = DDIMScheduler.from_config(SD21_SCHEDULER)
        unet = tiny_unet(seed + 3, time_cond_proj_dim=None, use_linear_projection=True)
        text_encoder = tiny_text_encoder(seed + 1, hidden_act="gelu", pad_token_id=0)
    else:
        scheduler = PNDMScheduler.from_config({**SD15_SCHEDULER, "skip_prk_steps": True})
        unet = tiny_unet(seed + 3, time_cond_proj_dim=None)
        text_encoder = tiny_text_encoder(seed + 1)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd(out_dir: str | Path, seed: int = 0, *, v_prediction: bool = False) -> Path:
    """Build a tiny SD pipeline (see :func:`tiny_sd_pipeline`) and ``save_pretrained`` it."""
    out_dir = Path(out_dir)
    tiny_sd_pipeline(seed, v_prediction=v_prediction).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


# -- latent x2 upscaler ----------------------------------------------------------------------------

#: the scheduler of stabilityai/sd-x2-latent-upscaler: Euler on the SD training schedule, and the UNet
#: (with the pipeline's Karras preconditioning) predicts the clean sample
UPSCALER_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="sample", steps_offset=1,
)


def tiny_upscaler_unet_config(*, cross_attention_dim: int = 32, text_hidden_size: int = 32, **overrides) -> dict:
    """sd-x2-latent-upscaler's K-UNet layout (K-blocks, Fourier time embedding, 1x1 in/out convs,
    no mid block, 8 channels in = noisy + low-res latents, 5 out = latents + a variance channel)
    at the size of diffusers' own tests. ``time_cond_proj_dim`` = 128 (noise-level embedding) +
    the text encoder's hidden size (its pooler output)."""
    cfg = dict(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 32, 64, 64),
        time_cond_proj_dim=128 + text_hidden_size, conv_in_kernel=1, conv_out_kernel=1,
        cross_attention_dim=cross_attention_dim,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
    )
    cfg.update(overrides)
    return cfg


def tiny_upscaler_pipeline(seed: int = 0):
    """An in-memory ``StableDiffusionLatentUpscalePipeline`` with tiny random weights.

    Its text encoder and VAE are those of :func:`tiny_lcm_pipeline` with the same ``seed`` (as the
    real upscaler shares SD's VAE latent space and CLIP text encoder), so a tiny LCM's latents can be
    handed to it directly, with the same prompt.
    """
    import tempfile

    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline, UNet2DConditionModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
    text_encoder = tiny_text_encoder(seed + 1)
    vae = tiny_vae(seed + 2)
    _seeded(seed + 5)
    hidden = text_encoder.config.hidden_size
    unet = UNet2DConditionModel(**tiny_upscaler_unet_config(cross_attention_dim=hidden, text_hidden_size=hidden)).eval()
    return StableDiffusionLatentUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(**UPSCALER_SCHEDULER),
    )


def save_tiny_upscaler(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny latent upscaler and ``save_pretrained`` it as a normal diffusers folder."""
    out_dir = Path(out_dir)
    tiny_upscaler_pipeline(seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------------------------------------
# tiny LoRAs (tests and demos): random low-rank updates in the two file formats users meet

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _lora_pairs(model, targets, rank: int, gen, scale: float):
    """(module name, down (r, in[, 1, 1]), up (out, r[, 1, 1])) for every Linear / 1x1 Conv target."""
    import torch

    out = []
    for name, mod in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        w = getattr(mod, "weight", None)
        if w is None or w.ndim not in (2, 4) or (w.ndim == 4 and tuple(w.shape[2:]) != (1, 1)):
            continue
        tail = tuple(w.shape[2:])
        down = torch.randn((rank, w.shape[1], *tail), generator=gen) * scale
        up = torch.randn((w.shape[0], rank, *tail), generator=gen) * scale
        out.append((name, down, up))
    return out


def save_tiny_lora(path: str | Path, pipe, *, rank: int = 4, fmt: str = "peft", text_encoder: bool = True,
                   alpha: float | None = None, seed: int = 0, scale: float = 0.2) -> Path:
    """Write a random LoRA for ``pipe``'s UNet (and text encoder) as one ``.safetensors`` file.

    ``fmt="peft"``: diffusers/PEFT keys (``unet.<module>.lora_A.weight`` / ``lora_B``; text encoder
    keys in the published ``text_encoder.text_model.…`` form). ``fmt="kohya"``: kohya-ss keys
    (``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``), the format of
    ``latent-consistency/lcm-lora-sdv1-5``. ``alpha`` (kohya only) scales the update by alpha/rank.
    """
    import torch
    from safetensors.torch import save_file

    if fmt not in ("peft", "kohya"):
        raise ValueError(f"fmt must be 'peft' or 'kohya'; got {fmt!r}")
    gen = torch.Generator().manual_seed(seed)
    parts = [("unet", "lora_unet_", _lora_pairs(pipe.unet, UNET_LORA_TARGETS, rank, gen, scale))]
    if text_encoder:
        te = pipe.text_encoder
        prefix = "" if hasattr(te, "text_model") else "text_model."  # keys as published (transformers 4 names)
        pairs = [(prefix + n, d, u) for n, d, u in _lora_pairs(te, TEXT_LORA_TARGETS, rank, gen, scale)]
        parts.append(("text_encoder", "lora_te_", pairs))
    sd = {}
    for peft_prefix, kohya_prefix, pairs in parts:
        for name, down, up in pairs:
            if fmt == "peft":
                sd[f"{peft_prefix}.{name}.lora_A.weight"] = down.contiguous()
                sd[f"{peft_prefix}.{name}.lora_B.weight"] = up.contiguous()
            else:
                key = kohya_prefix + name.replace(".", "_")
                sd[f"{key}.lora_down.weight"] = down.contiguous()
                sd[f"{key}.lora_up.weight"] = up.contiguous()
                sd[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# SDXL-shaped (two text encoders, pooled text embedding + add_time_ids), after diffusers' own
# StableDiffusionXLPipelineFastTests.get_dummy_components, with the real CLIP vocabulary

#: stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (without the version keys)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, interpolation_type="linear", prediction_type="epsilon", sample_max_value=1.0,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", trained_betas=None,
    use_karras_sigmas=False,
)

#: latent-consistency/lcm-sdxl scheduler/scheduler_config.json (without the version keys)
LCM_SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, clip_sample_range=1.0, original_inference_steps=50, prediction_type="epsilon",
    rescale_betas_zero_snr=False, set_alpha_to_one=True, steps_offset=1, timestep_scaling=10.0,
    timestep_spacing="leading", trained_betas=None,
)

TINY_SDXL_TEXT_2 = dict(TINY_TEXT, hidden_act="gelu", num_hidden_layers=4, pad_token_id=0, projection_dim=32)


def tiny_sdxl_unet_config(*, time_cond_proj_dim: int | None = None, ssd: bool = False, **overrides) -> dict:
    """SDXL's UNet at test size: ``addition_embed_type="text_time"``, 8-wide time-id embeddings, two
    transformer layers in the inner block, cross-attention on both encoders' concatenated widths
    (32 + 32). ``ssd=True`` gives it SSD-1B's trait: fewer transformer layers in the up blocks than the
    down blocks (``reverse_transformer_layers_per_block``)."""
    cfg = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    if ssd:
        cfg["reverse_transformer_layers_per_block"] = ((1, 1), (1, 1))
    cfg.update(overrides)
    return cfg


def tiny_sdxl_pipeline(seed: int = 0, *, lcm: bool = False, ssd: bool = False, img2img: bool = False,
                       vae_overrides: dict | None = None):
    """An in-memory ``StableDiffusionXLPipeline`` (or ``...Img2ImgPipeline``) with tiny random weights.

    ``lcm=False``: SDXL base (EulerDiscreteScheduler). ``lcm=True``: LCM-SDXL (a UNet with
    ``time_cond_proj_dim``, LCMScheduler). The VAE has SDXL's scaling factor and ``force_upcast``.
    """
    import tempfile

    from diffusers import (EulerDiscreteScheduler, LCMScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp) / "1")
        tokenizer_2 = tiny_tokenizer(Path(tmp) / "2", pad_token="!")
    _seeded(seed + 3)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config(time_cond_proj_dim=32 if lcm else None, ssd=ssd)).eval()
    _seeded(seed + 5)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2)).eval()
    scheduler = LCMScheduler.from_config(LCM_SDXL_SCHEDULER) if lcm else EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    return cls(
        vae=tiny_vae(seed + 2, **{"scaling_factor": 0.13025, "force_upcast": True, **(vae_overrides or {})}),
        text_encoder=tiny_text_encoder(seed + 1), text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


def save_tiny_sdxl(out_dir: str | Path, seed: int = 0, **kw) -> Path:
    """Build a tiny SDXL pipeline (see :func:`tiny_sdxl_pipeline`) and ``save_pretrained`` it."""
    out_dir = Path(out_dir)
    tiny_sdxl_pipeline(seed, **kw).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def make_fp16_overflowing(vae, factor: float = 1e5):
    """Scale the VAE decoder's first convolution so its activations exceed the fp16 range (65504)
    while the image stays the same in fp32 (the group norms that follow undo the scale): a test model
    for what the SDXL VAE does in fp16. Returns ``vae``, changed in place."""
    import torch

    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(factor)
        vae.decoder.conv_in.bias.mul_(factor)
    return vae
