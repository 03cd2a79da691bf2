"""FreeU (issue 17 item 2): ``freeu=(s1, s2, b1, b2)`` per call as the UNet graph's ``freeu`` input.

The filter equals diffusers' torch.fft ``fourier_filter`` (even, odd and 1-wide sides, fp16 cast); the
SD, LCM and SDXL pipelines equal diffusers with ``enable_freeu(...)`` within 1e-4 (fp32, tiny models,
odd latent sides at the low-resolution up block), after showing that FreeU changes diffusers' image;
without FreeU the same graph gives diffusers' plain image; bad input gets clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentrt
from latentrt.runtime.pipelines.base import BasePipeline
from latentrt.runtime.pipelines.freeu import FreeUError
from latentrt.runtime.random import TorchGeneratorNoise

TOL = 1e-4
SD15 = (0.9, 0.2, 1.5, 1.6)  # the FreeU authors' SD1.5 values
SDXL = (0.6, 0.4, 1.1, 1.2)


def _bundle(pipe, out):
    from latentrt.export.bundle import export_bundle

    pipe.set_progress_bar_config(disable=True)
    export_bundle(None, out, pipe=pipe, check="off", progress=lambda *_: None, freeu=True)
    return latentrt.load(out)


def _from_disk(pipe, folder):
    """``pipe`` saved and loaded back by diffusers, as users load a checkpoint (the reference and the export source)."""
    pipe.save_pretrained(str(folder))
    loaded = type(pipe).from_pretrained(str(folder), dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from latentrt.export.tiny import tiny_sd_pipeline

    ref = _from_disk(tiny_sd_pipeline(0), tmp_path_factory.mktemp("models") / "tiny-sd")
    return ref, _bundle(ref, tmp_path_factory.mktemp("bundles") / "sd-freeu")


def _images(pipe, seed, **kw):
    gen = TorchGeneratorNoise(seed) if isinstance(pipe, BasePipeline) else torch.Generator().manual_seed(seed)
    return pipe(**kw, generator=gen, output_type="np").images


def _check_parity(ref, ours, freeu, seed, **kw):
    """ours(freeu=...) == diffusers with enable_freeu(...); ours without == diffusers without."""
    plain = _images(ref, seed, **kw)
    ref.unet.enable_freeu(*freeu)
    try:
        want = _images(ref, seed, **kw)
    finally:
        ref.unet.disable_freeu()
    assert float(np.abs(want - plain).max()) > 1e-2  # FreeU changes diffusers' image
    got = _images(ours, seed, freeu=freeu, **kw)
    assert float(np.abs(got - want).max()) <= TOL
    off = _images(ours, seed, **kw)  # the same graph with the identity factors
    assert float(np.abs(off - plain).max()) <= TOL
    return got, off


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (2, 2), (3, 7), (4, 4), (5, 9), (8, 6), (17, 13)])
def test_fourier_filter_equals_torch_fft(shape):
    from diffusers.utils.torch_utils import fourier_filter as reference

    from latentrt.export.freeu import fourier_filter

    x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(shape[0] * 31 + shape[1]))
    for scale in (0.2, 1.0, 1.4):
        want = reference(x, threshold=1, scale=scale)
        assert float((fourier_filter(x, torch.tensor(scale)) - want).abs().max()) <= 1e-5
    h = x.half()  # diffusers filters in float32 and casts back
    got, want = fourier_filter(h, torch.tensor(0.7)), reference(h, threshold=1, scale=0.7)
    assert got.dtype == want.dtype == torch.float16
    assert float((got.float() - want.float()).abs().max()) <= 2e-3


def test_sd_freeu_matches_diffusers(sd):
    ref, ours = sd
    # 64x72 px: 8x9 latents, 4x5 at the UNet's lowest up block (odd sides)
    kw = dict(prompt="a cat on a hill", num_inference_steps=3, height=64, width=72, negative_prompt="blurry")
    got, off = _check_parity(ref, ours, SD15, 3, **kw)
    ours.enable_freeu(*SD15)  # the pipeline default, as diffusers' pipe.enable_freeu
    assert np.array_equal(_images(ours, 3, **kw), got)
    assert np.array_equal(_images(ours, 3, freeu=False, **kw), off)  # the call's choice wins
    ours.disable_freeu()
    assert np.array_equal(_images(ours, 3, **kw), off)
    # diffusers runs FreeU only when all four factors are truthy: a zero factor is FreeU off
    assert np.array_equal(_images(ours, 3, freeu=(0.9, 0.2, 0.0, 1.6), **kw), off)


def test_sd_img2img_freeu_matches_diffusers(sd, rgb_image):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline(**sd[0].components)
    ref.set_progress_bar_config(disable=True)
    _check_parity(ref, sd[1], SD15, 5, prompt="a red cat", image=rgb_image, strength=0.7, num_inference_steps=4)


def test_lcm_freeu_matches_diffusers(tmp_path):
    from latentrt.export.tiny import tiny_lcm_pipeline

    ref = _from_disk(tiny_lcm_pipeline(0), tmp_path / "tiny-lcm")
    ours = _bundle(ref, tmp_path / "lcm-freeu")
    _check_parity(ref, ours, SD15, 7, prompt="a dog", num_inference_steps=2, height=72, width=64)


def test_sdxl_freeu_matches_diffusers(tmp_path):
    from latentrt.export.tiny import tiny_sdxl_pipeline

    ref = _from_disk(tiny_sdxl_pipeline(0), tmp_path / "tiny-sdxl")
    ours = _bundle(ref, tmp_path / "sdxl-freeu")
    _check_parity(ref, ours, SDXL, 2, prompt="a castle", num_inference_steps=3, height=64, width=56)


def test_controlnet_unet_takes_freeu_too(tmp_path):
    """An export with --freeu and a ControlNet gives its residual UNet graph the input as well."""
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import tiny_sd_pipeline
    from latentrt.export.tiny_control import tiny_controlnet

    sd = _from_disk(tiny_sd_pipeline(0), tmp_path / "tiny-sd")
    cn = tiny_controlnet(sd.unet, 13)
    export_bundle(None, tmp_path / "cn", pipe=sd, check="off", progress=lambda *_: None, freeu=True, controlnets=[cn])
    ours = latentrt.load(tmp_path / "cn")
    ref = StableDiffusionControlNetPipeline(**sd.components, controlnet=cn)
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kw = dict(prompt="a cat", num_inference_steps=2, height=64, width=64)
    plain = _images(ref, 1, image=image, **kw)
    ref.unet.enable_freeu(*SD15)
    want = _images(ref, 1, image=image, **kw)
    ref.unet.disable_freeu()
    assert float(np.abs(want - plain).max()) > 1e-2
    assert float(np.abs(_images(ours, 1, control_image=image, freeu=SD15, **kw) - want).max()) <= TOL
    assert float(np.abs(_images(ours, 1, control_image=image, **kw) - plain).max()) <= TOL


def test_bad_freeu_values(sd):
    ours = sd[1]
    kw = dict(prompt="a cat", num_inference_steps=1, height=64, width=64)
    for bad, what in [((1.0, 2.0, 3.0), "four numbers"), ("a,b,c,d", "four numbers"), (1.5, "four numbers"),
                      ((1.0, "x", 1.0, 1.0), "four numbers"), ((True, 1, 1, 1), "four numbers"),
                      ((float("nan"), 1, 1, 1), "finite")]:
        with pytest.raises(FreeUError, match=what):
            ours(**kw, freeu=bad)
    assert issubclass(FreeUError, ValueError)


def test_freeu_on_a_bundle_without_the_input(lcm_bundle):
    ours = latentrt.load(lcm_bundle)
    assert "freeu" not in {s.name for s in ours.engines["unet"].inputs}  # plain bundles keep the plain graph
    with pytest.raises(FreeUError, match="--freeu"):
        ours("a cat", num_inference_steps=1, freeu=SD15)
    with pytest.raises(FreeUError, match="re-export"):
        ours.enable_freeu(*SD15)


def test_cli_generate_freeu(sd, tmp_path, capsys):
    from PIL import Image

    from latentrt.cli import main

    args = ["generate", str(sd[1].bundle.path), "a cat", "--steps", "2", "--height", "64", "--width", "64",
            "--no-progress", "--seed", "4"]
    assert main([*args, "-o", str(tmp_path / "on"), "--freeu", "0.9, 0.2, 1.5, 1.6"]) == 0
    got = np.asarray(Image.open(next((tmp_path / "on").glob("*.png"))), np.float32) / 255
    want = sd[1]("a cat", num_inference_steps=2, height=64, width=64, generator=4, freeu=SD15,
                 output_type="np").images[0]
    assert float(np.abs(got - want).max()) <= 1 / 255 + 1e-6  # the PNG's 8-bit rounding
    assert main([*args, "-o", str(tmp_path / "bad"), "--freeu", "0.9,0.2,1.5"]) == 2
    assert "four numbers" in capsys.readouterr().err


def test_export_refuses_freeu_for_the_k_unet(tmp_path):
    from latentrt.export.bundle import export_bundle
    from latentrt.export.freeu import FreeUExportError
    from latentrt.export.tiny import tiny_upscaler_pipeline

    with pytest.raises(FreeUExportError, match="without --freeu"):
        export_bundle(None, tmp_path / "up", pipe=tiny_upscaler_pipeline(0), check="off", freeu=True,
                      progress=lambda *_: None)
