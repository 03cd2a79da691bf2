"""Module-scoped tiny pipelines with tiny random ControlNets / T2I-Adapters."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sd_parts():
    """The tiny LCM pipeline's parts, a plain-SD UNet/scheduler, and two tiny ControlNets."""
    from latentrt.export.tiny import tiny_lcm_pipeline, tiny_sd_pipeline
    from latentrt.export.tiny_control import tiny_controlnet

    lcm = tiny_lcm_pipeline(0)
    sd = tiny_sd_pipeline(0)
    return {"lcm": lcm, "sd": sd, "cn": [tiny_controlnet(lcm.unet, 11), tiny_controlnet(lcm.unet, 12)],
            "cn_sd": tiny_controlnet(sd.unet, 13)}


