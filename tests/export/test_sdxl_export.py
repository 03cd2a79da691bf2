"""SDXL export pieces that the parity tests do not reach: SSD-1B's UNet shape and refused models."""

from __future__ import annotations

import pytest

from latentrt.export.onnx_export import ExportOptions, export_component
from latentrt.export.recipes import UnsupportedModelError, detect_kind


def test_ssd_1b_unet_exports(tmp_path):
    """SSD-1B (and LCM-SSD-1B) is an SDXL UNet with fewer transformer layers on the way up
    (``reverse_transformer_layers_per_block``); it exports as kind "sdxl" and matches torch."""
    from latentrt.export.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(4, lcm=True, ssd=True)
    recipe = detect_kind(pipe)
    assert recipe.kind == "sdxl"
    k = recipe.constants(pipe)
    plan = next(p for p in recipe.components(pipe, k) if p.spec.name == "unet")
    sizes = [{"B": 1, "H": 64, "W": 64}, {"B": 2, "H": 64, "W": 96}]
    entry = export_component(plan.module, plan.spec, tmp_path / "unet", export_sizes=sizes[0], check_sizes=sizes,
                             options=ExportOptions(value_ranges=plan.value_ranges, progress=lambda *_: None),
                             bundle_root=tmp_path)
    assert entry.parity["max_rel"] <= 1e-4


def test_sdxl_refiner_is_refused_with_a_clear_message():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from latentrt.export.tiny import tiny_sdxl_pipeline

    parts = tiny_sdxl_pipeline(0).components
    refiner = StableDiffusionXLImg2ImgPipeline(**{**parts, "text_encoder": None, "tokenizer": None},
                                               requires_aesthetics_score=True)
    with pytest.raises(UnsupportedModelError, match="refiner"):
        detect_kind(refiner).constants(refiner)
