"""The upscaler creates its VAE encoder on the first image input (latents never need it)."""

from __future__ import annotations

import numpy as np

import latentrt


def test_upscaler_creates_the_encoder_on_the_first_image(upscaler_bundle, rgb_image):
    pipe = latentrt.load(upscaler_bundle)
    low = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    pipe("a cat", image=low, num_inference_steps=2, generator=0, output_type="latent")
    assert "vae_encoder" not in pipe.engines
    pipe("a cat", image=rgb_image.resize((64, 64)), num_inference_steps=2, generator=0, output_type="latent")
    assert "vae_encoder" in pipe.engines
