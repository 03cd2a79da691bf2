"""Module-scoped tiny pipelines, tiny IP-Adapter files on disk and the bundles exported with them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ip_parts(tmp_path_factory):
    """Tiny LCM and SD pipelines, a ControlNet for the LCM UNet, and IP-Adapter weight files (with
    their image_encoder folders) in diffusers' on-disk format: plain for LCM, plus for SD."""
    from latentrt.export.tiny import tiny_lcm_pipeline, tiny_sd_pipeline
    from latentrt.export.tiny_control import tiny_controlnet
    from latentrt.export.tiny_ip_adapter import save_tiny_ip_adapter

    from ip_helpers import from_disk

    root = tmp_path_factory.mktemp("ip-weights")
    lcm, sd = from_disk(tiny_lcm_pipeline(0), root / "tiny-lcm"), from_disk(tiny_sd_pipeline(0), root / "tiny-sd")
    return {"lcm": lcm, "sd": sd, "cn": tiny_controlnet(lcm.unet, 11),
            "lcm_ip": save_tiny_ip_adapter(root / "lcm", lcm.unet),
            "sd_ip": save_tiny_ip_adapter(root / "sd", sd.unet, plus=True, seed=41)}


@pytest.fixture(scope="session")
def ip_bundles(ip_parts, tmp_path_factory):
    """fp32 bundles: the LCM with a ControlNet and the plain IP-Adapter (its weight file), the SD with the
    plus IP-Adapter (its folder)."""
    from ip_helpers import export

    root = tmp_path_factory.mktemp("ip-bundles")
    return {"lcm": export(ip_parts["lcm"], root / "lcm", ip_adapter=ip_parts["lcm_ip"], controlnets=[ip_parts["cn"]]),
            "sd": export(ip_parts["sd"], root / "sd", ip_adapter=str(ip_parts["sd_ip"].parent))}
