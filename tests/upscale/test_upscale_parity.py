"""Parity with diffusers' StableDiffusionLatentUpscalePipeline (tiny models, same noise, fp32):
max abs difference of the 0-1 images at most 1e-4, from latents and from images; and the chain
tiny LCM -> tiny upscaler (latents handed over) against the same chain in diffusers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import latentrt
from latentrt.runtime.pipelines.upscale import chain
from latentrt.runtime.random import TorchGeneratorNoise

FP32_TOL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cat on a hill"]

# every case: batch 2, non-square (latents 8x12 -> output 128x192 px)
CASES = {
    "guidance-0-1-step": dict(guidance_scale=0.0, num_inference_steps=1),
    "guidance-1-5-steps": dict(guidance_scale=1.0, num_inference_steps=5),
    "guidance-9-negative-20-steps": dict(guidance_scale=9.0, num_inference_steps=20,
                                         negative_prompt=["blurry", "low quality, dark"]),
}
IMAGE_CASES = {
    "guidance-0-20-steps": dict(guidance_scale=0.0, num_inference_steps=20),
    "guidance-1-1-step": dict(guidance_scale=1.0, num_inference_steps=1),
    "guidance-9-negative-5-steps": dict(guidance_scale=9.0, num_inference_steps=5,
                                        negative_prompt=["blurry", "low quality, dark"]),
}


def _assert_close(got, want, tol=FP32_TOL):
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max abs image difference {err:.3g} > {tol}"
    assert float(want.std()) > 1e-2  # not trivially constant


def _ref(pipe, seed, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images


def _ours(pipe, seed, **kw):
    return pipe(PROMPTS, generator=TorchGeneratorNoise(seed), output_type="np", **kw).images


@pytest.fixture(scope="module")
def low_res_latents():
    return torch.randn((2, 4, 8, 12), generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_latent_input_parity(case, ref_upscaler, ours_upscaler, low_res_latents):
    kw = CASES[case]
    want = _ref(ref_upscaler, 7, image=low_res_latents, **kw)
    got = _ours(ours_upscaler, 7, image=low_res_latents.numpy(), **kw)
    assert got.shape == (2, 128, 192, 3)
    _assert_close(got, want)


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_input_parity(case, ref_upscaler, ours_upscaler, images):
    kw = IMAGE_CASES[case]
    _assert_close(_ours(ours_upscaler, 3, image=images, **kw), _ref(ref_upscaler, 3, image=images, **kw))


def test_image_types_agree(ours_upscaler, images):
    """PIL list, NHWC uint8 array, NHWC float array and NCHW [-1, 1] array are the same input."""
    kw = dict(guidance_scale=0.0, num_inference_steps=1)
    nhwc = np.stack([np.asarray(i) for i in images])
    base = _ours(ours_upscaler, 1, image=images, **kw)
    for image in (nhwc, nhwc.astype(np.float32) / 255, [nhwc[0], nhwc[1]],
                  (nhwc.astype(np.float32) / 255 * 2 - 1).transpose(0, 3, 1, 2)):
        np.testing.assert_allclose(_ours(ours_upscaler, 1, image=image, **kw), base, atol=1e-6)


def test_latent_output_and_torch_latents(ref_upscaler, ours_upscaler, low_res_latents):
    """output_type="latent" gives the 2x latents; torch tensors are accepted as latents."""
    kw = dict(guidance_scale=0.0, num_inference_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        want = ref_upscaler(prompt=PROMPTS, image=low_res_latents, generator=torch.Generator().manual_seed(2),
                            output_type="latent", **kw).images.numpy()
    got = ours_upscaler(PROMPTS, image=low_res_latents, generator=TorchGeneratorNoise(2), output_type="latent",
                        **kw).images
    assert got.shape == (2, 4, 16, 24)
    assert float(np.abs(got - want).max()) < 1e-4


def test_chain_after_lcm_matches_diffusers(tiny_lcm_pipe, lcm_bundle, ref_upscaler, ours_upscaler):
    """LCM (output_type="latent") -> upscaler, one generator across both, in diffusers and here."""
    prompt = "a photograph of an astronaut riding a horse"
    gen_kw = dict(num_inference_steps=4, guidance_scale=8.0, height=64, width=96)
    up_kw = dict(num_inference_steps=5, guidance_scale=9.0, negative_prompt="blurry")
    g = torch.Generator().manual_seed(21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        low = tiny_lcm_pipe(prompt, generator=g, output_type="latent", **gen_kw).images
        want = ref_upscaler(prompt=prompt, image=low, generator=g, output_type="np", **up_kw).images
    lcm = latentrt.load(lcm_bundle)
    out = chain(lcm, ours_upscaler, prompt, generator=TorchGeneratorNoise(21), output_type="np",
                upscale_kwargs=up_kw, **gen_kw)
    assert out.images.shape == (1, 128, 192, 3)
    _assert_close(out.images, want)
    assert any(k.startswith("upscale.") for k in out.timings)


def test_fp16_bundle_parity(ref_upscaler, upscaler_bundle_fp16, low_res_latents):
    """fp16 engines (ONNX Runtime CPU inserts the casts) against fp32 diffusers: the LCM tests' 2e-2."""
    kw = dict(guidance_scale=9.0, num_inference_steps=5, negative_prompt=["blurry", "dark"])
    got = _ours(latentrt.load(upscaler_bundle_fp16), 7, image=low_res_latents.numpy(), **kw)
    _assert_close(got, _ref(ref_upscaler, 7, image=low_res_latents, **kw), tol=2e-2)


def test_prompt_embeds_parity(ref_upscaler, ours_upscaler, low_res_latents):
    """prompt_embeds / pooled_prompt_embeds (and the negative pair), as diffusers' encode_prompt makes them."""
    with torch.no_grad():
        pe, npe, ppe, nppe = ref_upscaler.encode_prompt(PROMPTS, "cpu", True, ["blurry", "dark"])
    kw = dict(guidance_scale=9.0, num_inference_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        want = ref_upscaler(image=low_res_latents, prompt_embeds=pe, negative_prompt_embeds=npe,
                            pooled_prompt_embeds=ppe, negative_pooled_prompt_embeds=nppe,
                            generator=torch.Generator().manual_seed(4), output_type="np", **kw).images
    got = ours_upscaler(image=low_res_latents.numpy(), prompt_embeds=pe.numpy(), negative_prompt_embeds=npe.numpy(),
                        pooled_prompt_embeds=ppe.numpy(), negative_pooled_prompt_embeds=nppe.numpy(),
                        generator=TorchGeneratorNoise(4), output_type="np", **kw).images
    _assert_close(got, want)
    by_text = _ours(ours_upscaler, 4, image=low_res_latents.numpy(), negative_prompt=["blurry", "dark"], **kw)
    _assert_close(got, by_text)  # torch-encoded vs ONNX-encoded text: the fp32 parity tolerance
