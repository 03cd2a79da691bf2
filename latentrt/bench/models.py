"""Benchmark models: full-size architectures with random weights, built from the published configs
(nothing is downloaded), saved once as diffusers folders and exported once to cached bundles.

``sd15-lcm`` is the SD1.5 LCM architecture of ``SimianLuo/LCM_Dreamshaper_v7``: its UNet
(``time_cond_proj_dim`` 256, cross-attention 768, blocks 320/640/1280/1280), the CLIP ViT-L/14 text
encoder, the SD VAE and TAESD (``madebyollin/taesd``). ``sample_size`` is 64 (512x512, the size the
issue's targets use; the Dreamshaper checkpoint says 96, which only changes the default size).
Random weights have the real cost per step; only the images are noise, which is fine for latency
and for comparing two runtimes on the same weights.

The cache (``~/.cache/latentrt/bench`` or ``--cache-dir``) holds ``models/<name>`` (diffusers
folders) and ``bundles/<name>-<precision>`` (bundles with TAESD), each written atomically, so a
second run starts at once. Full-size exports peak at several GB: components are built one at a
time and freed before the export.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Callable

SD15_LCM_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False, time_cond_proj_dim=256,
)

#: CLIP ViT-L/14 text encoder (openai/clip-vit-large-patch14), as in SD1.5's text_encoder/config.json
CLIP_VIT_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2, act_fn="silu",
    norm_num_groups=32, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)

#: madebyollin/taesd (diffusers AutoencoderTiny)
TAESD = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="relu", upsampling_scaling_factor=2,
    encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
    num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1),
    latent_magnitude=3, latent_shift=0.5, force_upcast=False, scaling_factor=1.0,
)

#: LCMScheduler of LCM_Dreamshaper_v7
LCM_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    original_inference_steps=50, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
    prediction_type="epsilon", timestep_spacing="leading", rescale_betas_zero_snr=False,
)

SEED = 1234


def default_cache_dir() -> Path:
    env = os.environ.get("LATENTRT_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "latentrt" / "bench"


def save_components(out: Path, steps, progress: Callable[[str], None] = print) -> None:
    """Build and save each ``(subfolder, make)`` in turn with a fixed seed per component, freeing it
    before the next (a full-size SDXL UNet alone is ~10 GB in fp32)."""
    import torch

    for i, (name, make) in enumerate(steps):
        progress(f"building {name} (random weights, seed {SEED + i})")
        torch.manual_seed(SEED + i)
        m = make().eval()
        # small shards: safetensors serialises a shard in memory, so a 10 GB shard would double the peak
        m.save_pretrained(str(out / name), safe_serialization=True, max_shard_size="2GB")
        del m
        gc.collect()


def save_sd15_lcm(out: Path, progress: Callable[[str], None] = print) -> None:
    """Write the random-weight SD1.5 LCM pipeline (and TAESD under ``taesd/``) one component at a time."""
    import json

    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..export.tiny import tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    steps = [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT))),
        ("unet", lambda: UNet2DConditionModel(**SD15_LCM_UNET)),
        ("vae", lambda: AutoencoderKL(**SD_VAE)),
        ("taesd", lambda: AutoencoderTiny(**TAESD)),
    ]
    save_components(out, steps, progress)
    tiny_tokenizer(out / "tokenizer")
    LCMScheduler(**LCM_SCHEDULER).save_config(str(out / "scheduler"))
    index = {
        "_class_name": "LatentConsistencyModelPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "LCMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def save_tiny(out: Path, progress: Callable[[str], None] = print) -> None:
    from ..export.tiny import save_tiny_lcm, save_tiny_taesd

    save_tiny_lcm(out)
    save_tiny_taesd(out / "taesd")


#: model name -> writer of its diffusers folder (with TAESD in ``taesd/``)
MODELS: dict[str, Callable[[Path, Callable], None]] = {"sd15-lcm": save_sd15_lcm, "tiny-lcm": save_tiny}

# the SDXL family (sdxl-lcm, sdxl-base, ssd-1b-lcm): see latentrt.bench.sdxl_models
from .sdxl_models import SDXL_MODELS as _SDXL_MODELS  # noqa: E402

MODELS.update(_SDXL_MODELS)
# the seed pipelines (sd-x2-upscaler, sd21-unclip-l, sd21-unclip-l-img2img): see latentrt.bench.seed_models
from .seed_models import SEED_MODELS as _SEED_MODELS  # noqa: E402

MODELS.update(_SEED_MODELS)


def ensure_model(name: str, cache_dir: Path | None = None, progress: Callable[[str], None] = print) -> Path:
    """The cached diffusers folder of model ``name``, built on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; known: {sorted(MODELS)} (or pass a bundle folder)")
    out = Path(cache_dir or default_cache_dir()) / "models" / name
    if not (out / "model_index.json").is_file():
        from ..export.bundle import atomic_bundle_dir

        with atomic_bundle_dir(out, overwrite=True) as tmp:  # an interrupted build leaves no half cache
            MODELS[name](tmp, progress)
    return out


def ensure_bundle(name: str, precision: str = "fp32", cache_dir: Path | None = None,
                  progress: Callable[[str], None] = print) -> Path:
    """The cached bundle (with TAESD) of model ``name`` at ``precision``, exported on first use."""
    cache = Path(cache_dir or default_cache_dir())
    src = ensure_model(name, cache, progress)
    out = cache / "bundles" / f"{name}-{precision}"
    if (out / "latentrt.json").is_file():
        return out
    from ..export.bundle import export_bundle
    from .baseline import quiet_loading

    quiet_loading()

    progress(f"exporting {name} ({precision}) to {out}; this happens once")
    big = name in _SDXL_MODELS or name in _SEED_MODELS
    # the SDXL VAE overflows in fp16 (diffusers upcasts it): fp16 SDXL bundles keep it in fp32
    keep_vae = {"vae_decoder": "fp32", "vae_encoder": "fp32"} if name in _SDXL_MODELS and precision == "fp16" else None
    # SDXL (10 GB fp32 UNet, 24 GiB machines) and the seed pipelines (a 4 GB prior next to a 3.5 GB
    # UNet): fp16 components load as fp16 (no fp32 copy), traced at 256x256, and not checked against
    # torch here (an ONNX Runtime session of the 5 GB fp16 UNet next to its torch module does not
    # fit); the benchmark's PSNR against diffusers fp32 checks the whole pipeline instead.
    sdxl = dict(low_memory=True, trace_size=256, check="off") if big else dict(check=False)
    taesd = src / "taesd"  # the seed pipelines' folders carry no TAESD
    export_bundle(src, out, precision=precision, tiny_vae=str(taesd) if taesd.is_dir() else None, progress=progress,
                  component_precision=keep_vae, **sdxl)
    gc.collect()
    return out


def model_folder_of(bundle: Path) -> Path | None:
    """The diffusers folder a bundle was exported from (for the baseline), when it still exists."""
    import json

    m = json.loads((Path(bundle) / "latentrt.json").read_text())
    path = (m.get("source") or {}).get("path")
    return Path(path) if path and Path(path, "model_index.json").is_file() else None


def taesd_folder_of(bundle: Path) -> Path | None:
    import json

    m = json.loads((Path(bundle) / "latentrt.json").read_text())
    tv = (m.get("extra") or {}).get("tiny_vae") or {}
    if tv.get("path") and Path(tv["path"]).is_dir():
        return Path(tv["path"])
    return tv.get("id")


# -- ControlNet (issue 13): lllyasviel/sd-controlnet-canny's architecture for the SD1.5 UNet ----------

#: ControlNetModel config of lllyasviel/sd-controlnet-canny (SD1.5 down blocks + conditioning embedding)
SD15_CONTROLNET = dict(
    in_channels=4, conditioning_channels=3, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
    conditioning_embedding_out_channels=(16, 32, 96, 256), controlnet_conditioning_channel_order="rgb",
    global_pool_conditions=False,
)

#: bench ControlNet name -> (its config, the bench model whose UNet it fits)
CONTROLNETS = {"sd15-controlnet-canny": (SD15_CONTROLNET, "sd15-lcm"),
               "tiny-controlnet": (None, "tiny-lcm")}


def ensure_controlnet(name: str, cache_dir: Path | None = None, progress: Callable[[str], None] = print) -> Path:
    """The cached ControlNetModel folder ``name`` (random weights, zero convolutions made non-zero
    and small so the residuals are realistic), built on first use."""
    if name not in CONTROLNETS:
        raise ValueError(f"unknown benchmark ControlNet {name!r}; known: {sorted(CONTROLNETS)}")
    cache = Path(cache_dir or default_cache_dir())
    out = cache / "models" / name
    if not (out / "config.json").is_file():
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel

        from ..export.bundle import atomic_bundle_dir
        from ..export.tiny_control import randomize_zero_convs

        config, base = CONTROLNETS[name]
        progress(f"building {name} (random weights, seed {SEED})")
        torch.manual_seed(SEED)
        if config is None:  # shaped like the tiny model's UNet
            unet = UNet2DConditionModel.from_pretrained(str(ensure_model(base, cache, progress) / "unet"))
            cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8),
                                           load_weights_from_unet=False)
        else:
            cn = ControlNetModel(**config)
        randomize_zero_convs(cn, SEED, std=0.01)
        with atomic_bundle_dir(out, overwrite=True) as tmp:
            cn.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="2GB")
    return out


def ensure_controlnet_bundle(name: str, precision: str = "fp32", cache_dir: Path | None = None,
                             progress: Callable[[str], None] = print) -> Path:
    """The cached bundle of bench model ``CONTROLNETS[name][1]`` plus ControlNet ``name``: the plain
    bundle's files hard-linked (not copied), then :func:`~latentrt.export.control_bundle.add_conditioning`
    (the residual UNet graph and the ControlNet)."""
    import shutil

    from ..export.bundle import atomic_bundle_dir
    from ..export.control_bundle import add_conditioning

    cache = Path(cache_dir or default_cache_dir())
    base_name = CONTROLNETS[name][1]
    out = cache / "bundles" / f"{base_name}-{name}-{precision}"
    if (out / "latentrt.json").is_file():
        return out
    base = ensure_bundle(base_name, precision, cache, progress)
    cn = ensure_controlnet(name, cache, progress)
    with atomic_bundle_dir(out, overwrite=True) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(base, tmp, copy_function=os.link, ignore=shutil.ignore_patterns(".cache"))
        add_conditioning(tmp, [str(cn)], src=str(ensure_model(base_name, cache, progress)), check="off",
                         progress=progress)
    return out
