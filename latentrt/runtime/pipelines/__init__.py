"""Runtime pipelines, one per bundle kind (the manifest's ``pipeline`` field).

Registered by name as "module:Class" so that loading one kind imports only its module.
"""

from __future__ import annotations

import importlib

PIPELINES = {
    "lcm": "latentrt.runtime.pipelines.lcm:LCMPipeline",
    "sdxl": "latentrt.runtime.pipelines.sdxl:SDXLPipeline",
    "sd": "latentrt.runtime.pipelines.sd:StableDiffusionPipeline",
    "latent_upscale": "latentrt.runtime.pipelines.upscale:LatentUpscalePipeline",
    "unclip": "latentrt.runtime.pipelines.unclip:UnCLIPPipeline",
    "unclip_img2img": "latentrt.runtime.pipelines.unclip:UnCLIPImg2ImgPipeline",
}


def pipeline_class(kind: str):
    if kind not in PIPELINES:
        raise ValueError(f"this latentrt has no runtime pipeline for bundles of kind {kind!r}; "
                         f"known kinds: {', '.join(PIPELINES)}")
    module, attr = PIPELINES[kind].split(":")
    return getattr(importlib.import_module(module), attr)
