"""Module-scoped tiny pipelines, tiny IP-Adapter files on disk and the bundles exported with them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ip_parts(tmp_path_factory):
    """Tiny LCM and SD pipelines, a ControlNet for the LCM UNet, and IP-Adapter weight files (with
    their image_encoder folders) in diffusers' on-disk format: plain for LCM, plus for SD."""
    from latentrt.export.tiny import tiny_lcm_pipeline, tiny_sd_pipeline
    from latentrt.export.tiny_control import tiny_controlnet
    from latentrt.export.tiny_ip_adapter import save_tiny_ip_adapter

    root = tmp_path_factory.mktemp("ip-weights")
    lcm, sd = tiny_lcm_pipeline(0), tiny_sd_pipeline(0)
    return {"lcm": lcm, "sd": sd, "cn": tiny_controlnet(lcm.unet, 11),
            "lcm_ip": save_tiny_ip_adapter(root / "lcm", lcm.unet),
            "sd_ip": save_tiny_ip_adapter(root / "sd", sd.unet, plus=True, seed=41)}


def export(pipe, out, **kw):
    import latentrt
    from latentrt.export.bundle import export_bundle

    export_bundle(None, out, pipe=pipe, check="off", progress=lambda *_: None, **kw)
    return latentrt.load(out)
