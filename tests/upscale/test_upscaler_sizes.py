"""The latent upscaler's sizes: exactly what diffusers renders (its K-UNet cannot take the
explicit-upsample-size branch the other UNets take: ``KUpsample2D`` doubles without an output size).
See tests/test_any_size.py for the other pipelines."""

from __future__ import annotations

import numpy as np
import torch

from latentrt.runtime.random import TorchGeneratorNoise


def test_upscaler_takes_exactly_the_sizes_diffusers_renders(ref_upscaler, ours_upscaler):
    """diffusers fails unless the latents round-trip the K-UNet's downsampling, and at the bottom its
    reflect padding needs 2 latents. The bundle's range is exactly that set (every latent side 1-20)."""
    ok = {}
    for n in range(1, 21):
        try:
            ref_upscaler("a cat", image=torch.randn(1, 4, n, 8), num_inference_steps=1, guidance_scale=0,
                         output_type="latent")
            ok[n] = True
        except RuntimeError:
            ok[n] = False
        try:
            ours_upscaler.check_size(n, 8)
            ours_ok = True
        except ValueError:
            ours_ok = False
        assert ours_ok == ok[n], f"latent side {n}: diffusers {'renders' if ok[n] else 'fails'}, we differ"
    assert [n for n, v in ok.items() if v] == [8, 12, 16, 20]


def test_upscaler_parity_at_its_smallest_non_square_size(ref_upscaler, ours_upscaler):
    """Latents 12x8 (96x64 px in): the UNet's bottom level is 3x2."""
    low = np.random.default_rng(0).standard_normal((1, 4, 12, 8)).astype(np.float32)
    kw = dict(prompt="a cat", num_inference_steps=2, guidance_scale=0, output_type="np")
    want = ref_upscaler(image=torch.from_numpy(low), generator=torch.Generator().manual_seed(12), **kw).images
    got = ours_upscaler(image=low, generator=TorchGeneratorNoise(12), **kw).images
    assert got.shape == want.shape == (1, 192, 128, 3)
    assert float(np.abs(got - want).max()) <= 1e-4 and float(want.std()) > 1e-2


def test_upscaler_records_max_batch(ours_upscaler):
    import pytest

    k = ours_upscaler.constants
    assert (k["size_multiple"], k["min_size"], k["max_size"], k["max_batch"]) == (32, 64, 1024, 16)
    with pytest.raises(ValueError, match=r"this call makes 17 images .*max_batch"):
        ours_upscaler(["a"] * 17, image=np.zeros((1, 4, 8, 8), np.float32), num_inference_steps=1,
                      guidance_scale=0, output_type="latent")
