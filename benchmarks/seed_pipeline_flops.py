"""FLOPs per call of each stage of the seed-pipeline benchmarks (x2 upscaler 512->1024, Stable unCLIP
768x768), counted by torch's FlopCounterMode on the meta device (no weights, no memory, seconds):
the same count for latentrt and diffusers, which run the same graphs.

    python benchmarks/seed_pipeline_flops.py
"""

from __future__ import annotations


def main() -> None:
    import torch
    from diffusers import AutoencoderKL, PriorTransformer, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from latentrt.bench import models as M
    from latentrt.bench import seed_models as S

    def gflop(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e9

    r = torch.randn
    with torch.device("meta"), torch.no_grad():
        up = UNet2DConditionModel(**S.X2_UPSCALER_UNET)
        vae = AutoencoderKL(**M.SD_VAE)
        unet = UNet2DConditionModel(**S.UNCLIP_SMALL_UNET)
        prior = PriorTransformer(**S.KARLO_PRIOR)
        text_h = CLIPTextModel(CLIPTextConfig(**S.OPENCLIP_H_TEXT))
        text_l = CLIPTextModel(CLIPTextConfig(**M.CLIP_VIT_L14_TEXT))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**S.CLIP_VIT_L14_VISION))
        ids = torch.zeros(1, 77, dtype=torch.long)
        rows = [
            ("x2 upscaler K-UNet step, 128x128 latents, batch 1 (guidance 0)",
             lambda: up(r(1, 8, 128, 128), torch.tensor([0.5]), encoder_hidden_states=r(1, 77, 768),
                        timestep_cond=r(1, 896))),
            ("VAE encode, 512x512", lambda: vae.encode(r(1, 3, 512, 512))),
            ("VAE decode, 1024x1024", lambda: vae.decode(r(1, 4, 128, 128))),
            ("CLIP ViT-L/14 text encoder, batch 1", lambda: text_l(ids)),
            ("unCLIP UNet step, 96x96 latents, batch 2 (CFG)",
             lambda: unet(r(2, 4, 96, 96), torch.tensor([500, 500]), encoder_hidden_states=r(2, 77, 1024),
                          class_labels=r(2, 1536))),
            ("karlo prior step, batch 2 (CFG)",
             lambda: prior(r(2, 768), torch.tensor([1, 1]), proj_embedding=r(2, 768),
                           encoder_hidden_states=r(2, 77, 768), attention_mask=torch.ones(2, 77, dtype=torch.bool))),
            ("OpenCLIP ViT-H text encoder, batch 1", lambda: text_h(ids)),
            ("CLIP ViT-L/14 image encoder, 224x224", lambda: vision(r(1, 3, 224, 224))),
            ("VAE decode, 768x768", lambda: vae.decode(r(1, 4, 96, 96))),
        ]
        print("| stage | GFLOP per call |\n|---|---|")
        for name, fn in rows:
            print(f"| {name} | {gflop(fn):.0f} |")


if __name__ == "__main__":
    main()
