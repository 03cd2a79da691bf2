"""FLOPs and parameters of the published safety checker's exported part (CLIP ViT-L/14 vision model +
visual projection, 224x224 input), counted by torch on the meta device (no weights, no hub):

    python benchmarks/safety_checker_flops.py
"""

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig

# CompVis/stable-diffusion-safety-checker's vision config and projection width
CONFIG = CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu"),
                    projection_dim=768)

if __name__ == "__main__":
    with torch.device("meta"):
        checker = StableDiffusionSafetyChecker(CONFIG).eval()
        pixels = torch.empty(1, 3, 224, 224)
    params = sum(p.numel() for m in (checker.vision_model, checker.visual_projection) for p in m.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        checker.visual_projection(checker.vision_model(pixels)[1])
    print(f"parameters: {params / 1e6:.1f} M; GFLOP per image: {counter.get_total_flops() / 1e9:.1f}")
