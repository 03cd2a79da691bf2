"""Bad inputs of the latent upscaler: clear errors, raised before any model runs long."""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.runtime.image import ImageInputError


def _call(pipe, image, prompt="a cat", **kw):
    return pipe(prompt, image=image, num_inference_steps=1, guidance_scale=0.0, generator=0, output_type="latent", **kw)


def test_nchw_image_with_5_channels(ours_upscaler):
    with pytest.raises(ImageInputError, match=r"5 channels.*RGB image \(3 channels\) or SD latents \(4 channels"):
        _call(ours_upscaler, np.zeros((1, 5, 8, 12), np.float32))


def test_nhwc_image_with_2_channels(ours_upscaler):
    with pytest.raises(ImageInputError, match="2 channels"):
        _call(ours_upscaler, np.zeros((64, 96, 2), np.uint8))


@pytest.mark.parametrize("shape", [(4, 8, 12), (1, 1, 4, 8, 12)])
def test_latents_of_wrong_rank(ours_upscaler, shape):
    with pytest.raises(ValueError, match=rf"latents must have rank 4 .*rank {len(shape)}"):
        _call(ours_upscaler, np.zeros(shape, np.float32))


def test_size_beyond_the_bundle_limit(ours_upscaler):
    limit = ours_upscaler.constants["max_size"]
    assert limit == 1024
    with pytest.raises(ValueError, match=r"max_size=1024 px \(output 2048 px\)"):
        _call(ours_upscaler, np.zeros((1, 4, limit // 8 + 4, 8), np.float32))


def test_image_beyond_the_bundle_limit_is_refused_before_encoding(ours_upscaler):
    from PIL import Image

    with pytest.raises(ValueError, match="max_size=1024"):
        _call(ours_upscaler, Image.new("RGB", (64, 1056)))


def test_size_not_a_multiple(ours_upscaler):
    with pytest.raises(ValueError, match=r"multiples of size_multiple=32 px .*latents: multiples of 4"):
        _call(ours_upscaler, np.zeros((1, 4, 10, 8), np.float32))


def test_size_below_minimum(ours_upscaler):
    with pytest.raises(ValueError, match="min_size=64"):
        _call(ours_upscaler, np.zeros((1, 4, 4, 8), np.float32))


def test_batch_mismatch(ours_upscaler):
    with pytest.raises(ValueError, match="3 input images/latents for 2 prompts"):
        _call(ours_upscaler, np.zeros((3, 4, 8, 8), np.float32), prompt=["a", "b"])


def test_one_input_for_two_prompts_is_repeated(ours_upscaler):
    out = _call(ours_upscaler, np.zeros((1, 4, 8, 8), np.float32), prompt=["a", "b"])
    assert out.images.shape == (2, 4, 16, 16)


def test_no_prompt_means_empty_prompts(ours_upscaler):
    low = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    a = ours_upscaler(image=low, num_inference_steps=1, guidance_scale=1.0, generator=0, output_type="latent").images
    b = ours_upscaler(["", ""], image=low, num_inference_steps=1, guidance_scale=1.0, generator=0,
                      output_type="latent").images
    np.testing.assert_array_equal(a, b)


def test_negative_prompt_count(ours_upscaler):
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but there are 2 prompts"):
        ours_upscaler(["a", "b"], image=np.zeros((2, 4, 8, 8), np.float32), num_inference_steps=1,
                      guidance_scale=5.0, negative_prompt=["x"] * 3)


def test_bad_output_type(ours_upscaler):
    with pytest.raises(ValueError, match="output_type must be 'pil', 'np' or 'latent'"):
        ours_upscaler("a", image=np.zeros((1, 4, 8, 8), np.float32), output_type="pt")


def test_initial_noise_shape(ours_upscaler):
    msg = r"latents \(the initial noise\) have shape \(1, 4, 8, 8\); expected \(1, 4, 16, 16\)"
    with pytest.raises(ValueError, match=msg):
        _call(ours_upscaler, np.zeros((1, 4, 8, 8), np.float32), latents=np.zeros((1, 4, 8, 8), np.float32))


def test_export_detects_the_upscaler(tiny_upscaler_dir):
    """The upscaler's UNet has a time_cond_proj_dim too: its recipe must win over LCM's."""
    from latentrt.export.bundle import load_pipeline
    from latentrt.export.recipes import detect_kind

    pipe, _ = load_pipeline(tiny_upscaler_dir)
    assert detect_kind(pipe).kind == "latent_upscale"


def test_engine_profile_limits_are_checked_up_front(ours_upscaler, monkeypatch):
    """Engines built for a shape profile (TensorRT) carry size ranges; the upscaler names the one hit."""
    monkeypatch.setattr(ours_upscaler.engines["unet"], "limits", {"H": (64, 128), "W": (64, 128)})
    with pytest.raises(ValueError, match=r"W=192 is outside the unet engine's profile range \[64, 128\]"):
        _call(ours_upscaler, np.zeros((1, 4, 8, 24), np.float32))


def test_prompt_embeds_need_pooled(ours_upscaler):
    with pytest.raises(ValueError, match="pooled_prompt_embeds too"):
        ours_upscaler(image=np.zeros((1, 4, 8, 8), np.float32), prompt_embeds=np.zeros((1, 77, 32), np.float32))
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        ours_upscaler("a", image=np.zeros((1, 4, 8, 8), np.float32), prompt_embeds=np.zeros((1, 77, 32), np.float32),
                      pooled_prompt_embeds=np.zeros((1, 32), np.float32))
