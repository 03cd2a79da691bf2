"""Stable unCLIP: parity with diffusers' StableUnCLIPPipeline (text -> prior -> image) and
StableUnCLIPImg2ImgPipeline (image variations) on tiny random models, same noise, fp32 bundles run
torch-free on ONNX Runtime: max abs image difference at most 1e-4. Plus the export's contents and
the bad-input messages.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import latentrt
from latentrt.manifest import BundleError
from latentrt.runtime.random import TorchGeneratorNoise

FP32_TOL = 1e-4
STEPS = dict(num_inference_steps=3)

T2I_CASES = {
    "guidance-1-noise-0": dict(guidance_scale=1.0, prior_guidance_scale=1.0, noise_level=0),
    "guidance-10-noise-0": dict(guidance_scale=10.0, prior_guidance_scale=4.0, noise_level=0),
    "guidance-10-noise-300-batch2-nonsquare": dict(
        prompt=["a red cat", "a blue dog on a hill"], negative_prompt=["blurry", "low quality"], guidance_scale=10.0,
        noise_level=300, height=64, width=96),
    "per-prompt-2-eta-noise-50": dict(num_images_per_prompt=2, noise_level=50, eta=1.0, guidance_scale=7.0,
                                      prior_guidance_scale=2.0),
}

I2I_CASES = {
    "no-prompt-guidance-1-noise-0": dict(guidance_scale=1.0, noise_level=0),
    "prompt-guidance-10-noise-200": dict(prompt="a watercolor fox", guidance_scale=10.0, noise_level=200),
    "no-prompt-guidance-10-noise-0": dict(guidance_scale=10.0, noise_level=0),
    "batch2-images-nonsquare-noise-100": dict(prompt=["a cat", "a castle"], n_images=2, guidance_scale=10.0,
                                              noise_level=100, height=64, width=96),
    "per-prompt-2-noise-500": dict(prompt="a cat", num_images_per_prompt=2, guidance_scale=3.0, noise_level=500),
}


def _export(pipe, out):
    from latentrt.export.bundle import export_bundle

    export_bundle(None, out, pipe=pipe, progress=lambda *_: None, check=False)
    return out


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """(diffusers reference, our pipeline on its exported bundle)."""
    from latentrt.export.tiny_unclip import tiny_unclip_pipeline

    ref = tiny_unclip_pipeline(0)
    ref.set_progress_bar_config(disable=True)
    bundle = _export(ref, tmp_path_factory.mktemp("bundles") / "unclip")
    return ref, latentrt.load(bundle), bundle


@pytest.fixture(scope="module")
def i2i(tmp_path_factory):
    from latentrt.export.tiny_unclip import tiny_unclip_img2img_pipeline

    ref = tiny_unclip_img2img_pipeline(0)
    ref.set_progress_bar_config(disable=True)
    bundle = _export(ref, tmp_path_factory.mktemp("bundles") / "unclip-img2img")
    return ref, latentrt.load(bundle), bundle


def photo(h, w, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), x * y], -1) * 0.4 + 0.5
    return Image.fromarray((np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1) * 255).astype(np.uint8))


def _run(pipe, seed, torch_side, **kw):
    g = torch.Generator().manual_seed(seed) if torch_side else TorchGeneratorNoise(seed)
    return pipe(**kw, generator=g, output_type="np").images


def _assert_close(got, want, tol=FP32_TOL):
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max abs image difference {err:.3g} > {tol}"
    assert float(want.std()) > 1e-2  # not a trivially constant image


@pytest.mark.parametrize("case", list(T2I_CASES))
def test_text_to_image_parity(case, t2i):
    ref, ours, _ = t2i
    kw = dict(T2I_CASES[case], prior_num_inference_steps=3, **STEPS)
    kw.setdefault("prompt", "a photograph of an astronaut riding a horse")
    _assert_close(_run(ours, 7, False, **kw), _run(ref, 7, True, **kw))


@pytest.mark.parametrize("case", list(I2I_CASES))
def test_image_variation_parity(case, i2i):
    ref, ours, _ = i2i
    kw = dict(I2I_CASES[case], **STEPS)
    n = kw.pop("n_images", 1)
    kw["image"] = photo(48, 40, 1) if n == 1 else [photo(48, 40, 1), photo(30, 70, 2)]
    _assert_close(_run(ours, 5, False, **kw), _run(ref, 5, True, **kw))


def test_image_embeds_and_latents_inputs(i2i):
    """Precomputed image_embeds (and given latents) instead of an image, as diffusers takes them."""
    ref, ours, _ = i2i
    pixels = ref.feature_extractor(images=photo(40, 40, 3), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = ref.image_encoder(pixels).image_embeds
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    kw = dict(prompt="a cat", num_images_per_prompt=2, noise_level=10, guidance_scale=5.0, **STEPS)
    want = ref(image_embeds=embeds, latents=latents, generator=torch.Generator().manual_seed(1), output_type="np",
               **kw).images
    got = ours(image_embeds=embeds.numpy(), latents=latents.numpy(), generator=TorchGeneratorNoise(1),
               output_type="np", **kw).images
    _assert_close(got, want)
    # pixel_values as the image (diffusers passes a tensor image straight to the encoder)
    want = _run(ref, 2, True, image=pixels, **STEPS)
    _assert_close(_run(ours, 2, False, image=pixels.numpy(), **STEPS), want)


def test_prior_latents_and_callback(t2i):
    ref, ours, _ = t2i
    prior_latents = torch.randn((1, 32), generator=torch.Generator().manual_seed(4))
    calls = {"ref": [], "ours": []}
    kw = dict(prompt="a cat", prior_num_inference_steps=2, noise_level=20, **STEPS)
    want = ref(prior_latents=prior_latents, generator=torch.Generator().manual_seed(3), output_type="np",
               callback=lambda i, t, x: calls["ref"].append((i, int(t), tuple(x.shape))), **kw).images
    got = ours(prior_latents=prior_latents.numpy(), generator=TorchGeneratorNoise(3), output_type="np",
               callback=lambda i, t, x: calls["ours"].append((i, int(t), tuple(x.shape))), **kw).images
    _assert_close(got, want)
    assert calls["ours"] == calls["ref"] and len(calls["ours"]) == 2 + 3  # prior steps, then UNet steps


def test_conditioning_matters(t2i, i2i):
    """The parity tests could not pass by ignoring the image embedding or noise_level."""
    _, ours, _ = t2i
    a = _run(ours, 1, False, prompt="a cat", noise_level=0, prior_num_inference_steps=2, **STEPS)
    b = _run(ours, 1, False, prompt="a cat", noise_level=600, prior_num_inference_steps=2, **STEPS)
    assert float(np.abs(a - b).max()) > 1e-3
    _, ours, _ = i2i
    a = _run(ours, 1, False, image=photo(40, 40, 1), guidance_scale=1.0, **STEPS)
    b = _run(ours, 1, False, image=photo(40, 40, 5), guidance_scale=1.0, **STEPS)
    assert float(np.abs(a - b).max()) > 1e-3


def test_bundle_contents(t2i, i2i):
    for (_, ours, bundle), kind, comps in (
        (t2i, "unclip", {"text_encoder", "unet", "vae_decoder", "prior_text_encoder", "prior"}),
        (i2i, "unclip_img2img", {"text_encoder", "unet", "vae_decoder", "image_encoder"}),
    ):
        m = json.loads((bundle / "latentrt.json").read_text())
        assert m["pipeline"] == kind and set(m["components"]) == comps
        assert m["constants"]["image_embed_dim"] == 32 and m["constants"]["class_embed_dim"] == 64
        unet_inputs = [s["name"] for s in m["components"]["unet"]["inputs"]]
        assert unet_inputs == ["sample", "timestep", "encoder_hidden_states", "class_labels"]
        assert (bundle / "image_noising_scheduler" / "scheduler_config.json").is_file()
        assert m["extra"]["unclip"]["embedding_stats"]["path"] == "image_normalizer/embedding_stats.npz"
    assert json.loads((t2i[2] / "prior_scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "sample"
    assert (i2i[2] / "feature_extractor" / "preprocessor_config.json").is_file()
    assert type(t2i[1]).__name__ == "UnCLIPPipeline" and type(i2i[1]).__name__ == "UnCLIPImg2ImgPipeline"


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("level", [-1, 1000, 2.5])
def test_noise_level_outside_schedule(level, t2i, i2i):
    for pipe, kw in ((t2i[1], {"prompt": "a cat"}), (i2i[1], {"image": photo(32, 32, 0)})):
        with pytest.raises(ValueError, match=r"noise_level must be an integer in \[0, 999\]"):
            pipe(**kw, noise_level=level, output_type="np")


def test_image_embeds_of_the_wrong_width(i2i):
    with pytest.raises(ValueError, match=r"image_embeds must have shape \(batch, 32\).*got shape \(1, 48\)"):
        i2i[1](image_embeds=np.zeros((1, 48), np.float32), output_type="np")


def test_variation_needs_an_image_or_embeddings(i2i):
    with pytest.raises(ValueError, match="needs an image or image_embeds"):
        i2i[1](prompt="a cat", output_type="np")
    with pytest.raises(ValueError, match="either image or image_embeds"):
        i2i[1](image=photo(32, 32, 0), image_embeds=np.zeros((1, 32), np.float32), output_type="np")
    with pytest.raises(TypeError, match="image must be a PIL image"):
        i2i[1](image="cat.png", output_type="np")


def test_other_bad_inputs(t2i, i2i):
    with pytest.raises(ValueError, match="pass a prompt"):
        t2i[1](output_type="np")
    with pytest.raises(ValueError, match=r"prior_latents have shape \(2, 32\); expected \(1, 32\)"):
        t2i[1]("a cat", prior_latents=np.zeros((2, 32), np.float32), output_type="np")
    with pytest.raises(ValueError, match="one negative prompt per prompt"):
        t2i[1](["a", "b"], negative_prompt=["x"], output_type="np", **STEPS)
    with pytest.raises(ValueError, match="1 image.*for 2 prompt"):
        i2i[1](image=[photo(32, 32, 0)], prompt=["a", "b"], output_type="np")


def test_corrupted_embedding_stats(t2i, tmp_path):
    import shutil

    bundle = tmp_path / "copy"
    shutil.copytree(t2i[2], bundle)
    path = bundle / "image_normalizer" / "embedding_stats.npz"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="embedding_stats.npz is missing or corrupted"):
        latentrt.load(bundle)


def test_image_first_positional_like_diffusers(i2i):
    _, ours, _ = i2i
    img = photo(40, 40, 1)
    a = ours(img, generator=TorchGeneratorNoise(0), output_type="np", **STEPS).images
    b = ours(image=img, generator=TorchGeneratorNoise(0), output_type="np", **STEPS).images
    c = ours("", img, generator=TorchGeneratorNoise(0), output_type="np", **STEPS).images
    assert np.array_equal(a, b) and np.array_equal(a, c)


@pytest.mark.parametrize("which", ["t2i", "i2i"])
def test_cli_generate(which, t2i, i2i, tmp_path):
    from latentrt.cli import main

    bundle = (t2i if which == "t2i" else i2i)[2]
    args = ["generate", str(bundle), "a cat", "--steps", "2", "--no-progress", "-o", str(tmp_path / "out")]
    if which == "i2i":
        photo(40, 40, 1).save(tmp_path / "in.png")
        args += ["--image", str(tmp_path / "in.png")]
    assert main(args) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
