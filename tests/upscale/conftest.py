"""Fixtures of the latent-upscaler tests: the tiny upscaler (diffusers folder, reference pipeline,
exported bundle), built once per session.

torch runs single-threaded here: on these small, shared CPUs its thread pool costs far more than
it gains for tiny models (measured 40x slower per UNet call under load)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_upscaler_dir(tmp_path_factory):
    from latentrt.export.tiny import save_tiny_upscaler

    return save_tiny_upscaler(tmp_path_factory.mktemp("models") / "tiny-upscaler")


@pytest.fixture(scope="session")
def ref_upscaler(tiny_upscaler_dir):
    """diffusers' StableDiffusionLatentUpscalePipeline, loaded from the saved folder."""
    import torch
    from diffusers import StableDiffusionLatentUpscalePipeline

    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(str(tiny_upscaler_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def upscaler_bundle(tiny_upscaler_dir, tmp_path_factory):
    from latentrt.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "upscaler-fp32"
    export_bundle(tiny_upscaler_dir, out, progress=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def ours_upscaler(upscaler_bundle):
    import latentrt

    return latentrt.load(upscaler_bundle)


@pytest.fixture(scope="session")
def upscaler_bundle_fp16(tiny_upscaler_dir, tmp_path_factory):
    from latentrt.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "upscaler-fp16"
    export_bundle(tiny_upscaler_dir, out, precision="fp16", progress=lambda *_: None)
    return out
