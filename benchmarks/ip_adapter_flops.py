"""What an IP-Adapter adds to a call, in FLOPs, on the full-size SD1.5 architecture (no weights: every
tensor is on torch's meta device, so this takes seconds and no memory).

    python benchmarks/ip_adapter_flops.py

Counts with torch's FlopCounterMode, batch 1, 64x64 latents (512x512 images), 77 text tokens: one step of
the plain UNet (``SimianLuo/LCM_Dreamshaper_v7``'s config, ``latentrt.bench.models.SD15_LCM_UNET``), of
the IP UNet graph's module (``latentrt.export.ip_adapter``: the same UNet with IP attention) for a plain
IP-Adapter (4 tokens, as h94's ip-adapter_sd15) and a plus one (16 tokens and a 768-wide Resampler, as
ip-adapter-plus_sd15), and one
run of the image encoder of h94/IP-Adapter's ``models/image_encoder`` (OpenCLIP ViT-H/14, 224 px) and of
the projections. The IP-Adapter weights are random, in the original file layout
(``latentrt.export.tiny_ip_adapter``), loaded by diffusers' ``_load_ip_adapter_weights``.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

#: h94/IP-Adapter models/image_encoder (OpenCLIP ViT-H/14)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")


def gflops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def main() -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from latentrt.bench.models import SD15_LCM_UNET
    from latentrt.export.ip_adapter import ImageEncoderWrapper, ip_wrapper_class
    from latentrt.export.tiny_ip_adapter import tiny_ip_adapter_state_dict
    from latentrt.export.wrappers import UNetWrapper

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**SD15_LCM_UNET)
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
    x, t = torch.zeros(1, 4, 64, 64, device=meta), torch.zeros(1, device=meta)
    e, tc = torch.zeros(1, 77, 768, device=meta), torch.zeros(1, SD15_LCM_UNET["time_cond_proj_dim"], device=meta)
    names = ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    base = gflops(lambda: UNetWrapper(unet, names)(x, t, e, tc))
    pixels = torch.zeros(1, 3, 224, 224, device=meta)
    rows = [("UNet step, no IP-Adapter (the plain `unet` graph)", base, "")]
    for plus, tokens in ((False, 4), (True, 16)):
        sd = tiny_ip_adapter_state_dict(unet, SimpleNamespace(config=SimpleNamespace(**VIT_H)), plus=plus,
                                        num_tokens=tokens, plus_width=768)
        state = {part: {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
                 for part in ("image_proj", "ip_adapter")}
        u = copy.deepcopy(unet)
        u._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
        u = u.to(meta)
        w = ip_wrapper_class(UNetWrapper)(u, [*names, "ip_tokens", "ip_adapter_scale"])
        step = gflops(lambda: w(x, t, e, tc, torch.zeros(1, tokens, 768, device=meta), torch.zeros(1, device=meta)))
        kind = "plus" if plus else "plain"
        rows.append((f"UNet step with a {kind} IP-Adapter ({tokens} tokens)", step,
                     f"+{step - base:.2f} GFLOP ({100 * (step - base) / base:.2f}%)"))
        feats = ImageEncoderWrapper(enc, plus)(pixels)
        layer = u.encoder_hid_proj.image_projection_layers[0]
        rows.append((f"image encoder ({'penultimate hidden states' if plus else 'image_embeds'}), once per image",
                     gflops(lambda: ImageEncoderWrapper(enc, plus)(pixels)), ""))
        rows.append((f"{kind} projection, once per call", gflops(lambda: layer(feats)), ""))
    print("| what (batch 1, 512x512) | GFLOP | vs plain step |\n|---|---:|---|")
    for what, g, note in rows:
        print(f"| {what} | {g:.2f} | {note} |")


if __name__ == "__main__":
    main()
