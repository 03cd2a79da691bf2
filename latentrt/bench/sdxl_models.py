"""Full-size SDXL-family architectures for the benchmarks, random weights, from the published configs.

* ``sdxl-lcm``: ``latent-consistency/lcm-sdxl``: the SDXL UNet with ``time_cond_proj_dim`` 256
  (2.57B parameters), LCMScheduler, 1024x1024 in 4 steps;
* ``sdxl-base``: ``stabilityai/stable-diffusion-xl-base-1.0`` (EulerDiscreteScheduler); with
  ``latent-consistency/lcm-lora-sdxl`` fused it has the same cost per step, so it stands for
  "LCM-LoRA SDXL" too (a fused LoRA changes weights, not shapes);
* ``ssd-1b-lcm``: ``latent-consistency/lcm-ssd-1b``: segmind's distilled SSD-1B UNet (1.3B: fewer
  transformer layers, no mid block) with ``time_cond_proj_dim`` 256.

All share the two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with projection), the SDXL
VAE (``force_upcast``: keep it fp32 in fp16 bundles) and TAESDXL (``madebyollin/taesdxl``, the TAESD
architecture). Nothing here is downloaded; writers build one component at a time (the UNet alone is
~10 GB in fp32), so they are for a benchmark machine, not for the tests, which only count
parameters on the meta device (:func:`count_parameters`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    time_cond_proj_dim=None,
)

#: latent-consistency/lcm-sdxl unet/config.json: SDXL's UNet plus the guidance embedding
LCM_SDXL_UNET = dict(SDXL_BASE_UNET, time_cond_proj_dim=256)

#: latent-consistency/lcm-ssd-1b (segmind/SSD-1B distilled): transformer depths 2/4 down, up blocks
#: (deepest first) 4,4,10 / 2,1,1, and no mid block (ComfyUI: transformer_depth [0,0,2,2,4,4],
#: transformer_depth_output [0,0,0,1,1,2,10,4,4], transformer_depth_middle -1)
LCM_SSD_1B_UNET = dict(
    SDXL_BASE_UNET, transformer_layers_per_block=(1, 2, 4),
    reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1)),
    mid_block_type=None, time_cond_proj_dim=256,
)

#: text_encoder: CLIP ViT-L/14 (as SD1.5's, SDXL uses its penultimate hidden state)
SDXL_TEXT_1 = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
#: text_encoder_2: OpenCLIP ViT-bigG/14 text tower (CLIPTextModelWithProjection)
SDXL_TEXT_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
#: stabilityai/sdxl-vae (the SD VAE architecture at SDXL's scaling factor; overflows in fp16)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, layers_per_block=2, act_fn="silu",
    norm_num_groups=32, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, force_upcast=True,
)

#: model name -> (UNet config, LCM?) ; parameter counts of the UNets (measured, see count_parameters)
SDXL_MODEL_CONFIGS = {
    "sdxl-lcm": (LCM_SDXL_UNET, True),
    "sdxl-base": (SDXL_BASE_UNET, False),
    "ssd-1b-lcm": (LCM_SSD_1B_UNET, True),
}


def count_parameters(kind: str, config: dict) -> int:
    """Parameters of a diffusers/transformers model built on the meta device (no memory, ~1 s)."""
    import torch

    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**config)
        elif kind == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL(**config)
        elif kind in ("text", "text_projection"):
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if kind == "text_projection" else CLIPTextModel
            model = cls(CLIPTextConfig(**config))
        else:
            raise ValueError(f"unknown kind {kind!r}")
    return sum(p.numel() for p in model.parameters())


def save_sdxl(out: Path, name: str, progress: Callable[[str], None] = print) -> None:
    """Write a random-weight SDXL-family pipeline folder (``StableDiffusionXLPipeline`` layout, TAESDXL
    under ``taesd/``), one component at a time (LCM-SDXL: 65 s, peak RSS 10.4 GB, the fp32 UNet)."""
    from diffusers import (AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, LCMScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..export.tiny import LCM_SDXL_SCHEDULER, SDXL_SCHEDULER, tiny_tokenizer
    from .models import TAESD, save_components

    if name not in SDXL_MODEL_CONFIGS:
        raise ValueError(f"unknown SDXL benchmark model {name!r}; known: {sorted(SDXL_MODEL_CONFIGS)}")
    unet_config, lcm = SDXL_MODEL_CONFIGS[name]
    out.mkdir(parents=True, exist_ok=True)
    steps = [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_1))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))),
        ("unet", lambda: UNet2DConditionModel(**unet_config)),
        ("vae", lambda: AutoencoderKL(**SDXL_VAE)),
        ("taesd", lambda: AutoencoderTiny(**TAESD)),
    ]
    save_components(out, steps, progress)
    tiny_tokenizer(out / "tokenizer")
    tiny_tokenizer(out / "tokenizer_2", pad_token="!")
    sched = LCMScheduler.from_config(LCM_SDXL_SCHEDULER) if lcm else EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    sched.save_config(str(out / "scheduler"))
    index = {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", type(sched).__name__], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


#: writers for ``latentrt.bench.models.MODELS`` (same signature: (out, progress))
SDXL_MODELS: dict[str, Callable[[Path, Callable], None]] = {
    name: (lambda out, progress=print, _n=name: save_sdxl(out, _n, progress)) for name in SDXL_MODEL_CONFIGS
}
