"""Parity with diffusers' LCM pipelines: same weights, same inputs, same noise -> same image.

fp32 bundle: max abs difference of the 0-1 images at most 1e-4; fp16 bundle: at most 2e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentrt
from latentrt.runtime.random import TorchGeneratorNoise

FP32_TOL = 1e-4
FP16_TOL = 2e-2

TXT2IMG_CASES = {
    "1-step": dict(num_inference_steps=1),
    "2-steps": dict(num_inference_steps=2),
    "4-steps": dict(num_inference_steps=4),
    "8-steps": dict(num_inference_steps=8),
    "custom-timesteps": dict(timesteps=[999, 599, 199]),
    "original-steps-30": dict(num_inference_steps=4, original_inference_steps=30),
    "guidance-1": dict(num_inference_steps=4, guidance_scale=1.0),
    "guidance-8": dict(num_inference_steps=4, guidance_scale=8.0),
    "batch2x2": dict(prompt=["a red cat", "a blue dog on a hill"], num_images_per_prompt=2, num_inference_steps=2),
    "non-square": dict(height=64, width=96, num_inference_steps=4),
}

IMG2IMG_CASES = {
    "1-step": dict(num_inference_steps=1, strength=1.0),
    "2-steps": dict(num_inference_steps=2, strength=0.6),
    "4-steps": dict(num_inference_steps=4, strength=0.5),
    "8-steps": dict(num_inference_steps=8, strength=0.8),
    "custom-timesteps": dict(timesteps=[799, 399], strength=0.9),
    "original-steps-30": dict(num_inference_steps=4, original_inference_steps=30, strength=0.7),
    "guidance-1": dict(num_inference_steps=4, guidance_scale=1.0),
    "guidance-8": dict(num_inference_steps=4, guidance_scale=8.0),
    "batch2x2": dict(prompt=["a red cat", "a blue dog on a hill"], num_images_per_prompt=2, num_inference_steps=2),
}


def _ref(pipe, seed, **kw):
    kw.setdefault("prompt", "a photograph of an astronaut riding a horse")
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(**kw, generator=g, output_type="np").images


def _ours(bundle_pipe, seed, **kw):
    kw.setdefault("prompt", "a photograph of an astronaut riding a horse")
    return bundle_pipe(**kw, generator=TorchGeneratorNoise(seed), output_type="np").images


@pytest.fixture(scope="module")
def ours32(lcm_bundle):
    return latentrt.load(lcm_bundle)


@pytest.fixture(scope="module")
def ours16(lcm_bundle_fp16):
    return latentrt.load(lcm_bundle_fp16)


@pytest.fixture(scope="module")
def ref_img2img(tiny_lcm_pipe):
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    pipe = LatentConsistencyModelImg2ImgPipeline(**tiny_lcm_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_close(got, want, tol):
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max abs image difference {err:.3g} > {tol}"
    # the images must not be trivially constant (a parity test that cannot fail)
    assert float(want.std()) > 1e-2


@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
def test_txt2img_parity_fp32(case, tiny_lcm_pipe, ours32):
    kw = TXT2IMG_CASES[case]
    _assert_close(_ours(ours32, 11, **kw), _ref(tiny_lcm_pipe, 11, **kw), FP32_TOL)


@pytest.mark.parametrize("case", list(IMG2IMG_CASES))
def test_img2img_parity_fp32(case, ref_img2img, ours32, rgb_image):
    kw = dict(IMG2IMG_CASES[case], image=rgb_image)
    _assert_close(_ours(ours32, 5, **kw), _ref(ref_img2img, 5, **kw), FP32_TOL)


@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
def test_txt2img_parity_fp16(case, tiny_lcm_pipe, ours16):
    kw = TXT2IMG_CASES[case]
    _assert_close(_ours(ours16, 11, **kw), _ref(tiny_lcm_pipe, 11, **kw), FP16_TOL)


@pytest.mark.parametrize("case", list(IMG2IMG_CASES))
def test_img2img_parity_fp16(case, ref_img2img, ours16, rgb_image):
    kw = dict(IMG2IMG_CASES[case], image=rgb_image)
    _assert_close(_ours(ours16, 5, **kw), _ref(ref_img2img, 5, **kw), FP16_TOL)


def _clip_skip_embeds(pipe, prompt, clip_skip):
    """What diffusers' encode_prompt computes for clip_skip (its own code path reaches for
    ``text_encoder.text_model``, which transformers 5 removed, so we compute it the same way here)."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        te = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
        return te.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clip_skip_parity(precision, tiny_lcm_pipe, ours32, ours16):
    prompt = "a watercolor fox"
    ours = ours32 if precision == "fp32" else ours16
    want = _ref(tiny_lcm_pipe, 3, prompt=None, prompt_embeds=_clip_skip_embeds(tiny_lcm_pipe, prompt, 1),
                num_inference_steps=4)
    got = _ours(ours, 3, prompt=prompt, clip_skip=1, num_inference_steps=4)
    _assert_close(got, want, FP32_TOL if precision == "fp32" else FP16_TOL)
    # and clip_skip really changes the result
    plain = _ours(ours, 3, prompt=prompt, num_inference_steps=4)
    assert float(np.abs(plain - got).max()) > 1e-3


def test_prompt_embeds_and_latents_inputs(tiny_lcm_pipe, ours32):
    embeds = _clip_skip_embeds(tiny_lcm_pipe, "a cat", 0)  # clip_skip 0 == last_hidden_state
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    want = tiny_lcm_pipe(prompt_embeds=embeds, latents=latents, num_inference_steps=2,
                         generator=torch.Generator().manual_seed(2), output_type="np").images
    got = ours32(prompt_embeds=embeds.numpy(), latents=latents.numpy(), num_inference_steps=2,
                 generator=TorchGeneratorNoise(2), output_type="np").images
    _assert_close(got, want, FP32_TOL)


def test_latent_output_matches_denoised(tiny_lcm_pipe, ours32):
    want = tiny_lcm_pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(4),
                         output_type="latent").images.numpy()
    got = ours32("a cat", num_inference_steps=2, generator=TorchGeneratorNoise(4), output_type="latent").images
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) < 1e-4
