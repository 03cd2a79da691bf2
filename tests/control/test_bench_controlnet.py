"""The benchmark's ControlNets: the SD1.5 architecture fits the SD1.5 UNet, and the cached ControlNet
bundle shares the plain bundle's files (hard links) and adds only the control graphs."""

from __future__ import annotations

import json

from latentrt.bench import models
from latentrt.components import unet_down_residual_shapes


def test_sd15_controlnet_fits_the_sd15_unet():
    def shapes(cfg):
        return unet_down_residual_shapes(block_out_channels=cfg["block_out_channels"],
                                         layers_per_block=cfg["layers_per_block"], vae_scale_factor=8)

    down, mid = shapes(models.SD15_CONTROLNET)
    assert (down, mid) == shapes(models.SD15_LCM_UNET)
    assert len(down) == 12 and mid == (1280, 64)  # the 12 skips and the mid block of SD1.5 at 1/64
    assert models.SD15_CONTROLNET["cross_attention_dim"] == models.SD15_LCM_UNET["cross_attention_dim"]


def test_tiny_controlnet_bundle_links_the_plain_bundle(tmp_path):
    out = models.ensure_controlnet_bundle("tiny-controlnet", cache_dir=tmp_path, progress=lambda *_: None)
    plain = tmp_path / "bundles" / "tiny-lcm-fp32"
    assert (out / "unet" / "model.onnx").stat().st_ino == (plain / "unet" / "model.onnx").stat().st_ino
    m = json.loads((out / "latentrt.json").read_text())
    assert {"unet_controlnet", "controlnet_0"} <= set(m["components"])
    assert "control" not in json.loads((plain / "latentrt.json").read_text()).get("extra", {})
    assert models.ensure_controlnet_bundle("tiny-controlnet", cache_dir=tmp_path) == out  # cached
