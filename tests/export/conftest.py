"""Fixtures of the LoRA export tests: a tiny SD folder on disk and diffusers' pipeline loaded from it
(module scope: each test module gets its own, so no module sees another's changes)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from latentrt.export.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def base(sd_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
