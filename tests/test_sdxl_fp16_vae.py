"""The SDXL VAE overflows in fp16: a tiny VAE whose decoder activations exceed the fp16 range shows
both behaviours. All-fp16, export refuses the decoder (its ONNX graph gives NaN/inf, which the
export check turns into a clear ExportError); an fp16 bundle with ``vae_decoder`` kept in fp32 gives
finite images that match diffusers in fp32 within the fp16 tolerance."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import latentrt
from latentrt import components as C
from latentrt.export.onnx_export import ExportError, ExportOptions, export_component
from latentrt.export.wrappers import VaeDecoderWrapper
from latentrt.runtime.random import TorchGeneratorNoise

FP16_TOL = 2e-2


@pytest.fixture(scope="module")
def overflowing():
    from latentrt.export.tiny import make_fp16_overflowing, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(2, lcm=True)
    make_fp16_overflowing(pipe.vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_all_fp16_vae_decoder_overflows(overflowing, tmp_path):
    spec = C.vae_decoder_spec(out_channels=3, latent_channels=4, vae_scale_factor=8)
    sizes = {"B": 1, "H": 64, "W": 64}
    opts = ExportOptions(precision="fp16", progress=lambda *_: None)
    with pytest.raises(ExportError, match=r"vae_decoder\.sample: ONNX output has NaN/inf .*\(fp16\)"):
        export_component(VaeDecoderWrapper(overflowing.vae), spec, tmp_path / "vae_decoder", export_sizes=sizes,
                         check_sizes=[sizes], options=opts, bundle_root=tmp_path)
    # the refused graph really overflows, where the fp32 model is finite
    z = (np.random.default_rng(0).standard_normal((1, 4, 8, 8)) / 0.13025).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert not np.isfinite(sess.run(None, {"latent_sample": z.astype(np.float16)})[0]).all()
    with torch.no_grad():
        assert torch.isfinite(overflowing.vae.decode(torch.from_numpy(z)).sample).all()


def test_fp16_bundle_with_fp32_vae_is_finite(overflowing, tmp_path):
    from latentrt.export.bundle import export_bundle

    export_bundle(None, tmp_path / "b", pipe=overflowing, precision="fp16", check=False, progress=lambda *_: None,
                  component_precision={"vae_decoder": "fp32", "vae_encoder": "fp32"})
    ours = latentrt.load(tmp_path / "b")
    precisions = {k: e.precision for k, e in ours.bundle.manifest.components.items()}
    assert precisions == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16",
                          "vae_encoder": "fp32", "vae_decoder": "fp32"}
    kw = dict(prompt="a red fox in the snow", num_inference_steps=2, output_type="np")
    got = ours(**kw, generator=TorchGeneratorNoise(1)).images
    want = overflowing(**kw, generator=torch.Generator().manual_seed(1)).images
    assert np.isfinite(got).all() and float(got.std()) > 1e-2
    err = float(np.abs(got - want).max())
    assert err <= FP16_TOL, f"max abs image difference {err:.3g} > {FP16_TOL}"


def test_all_fp16_bundle_with_an_fp16_safe_vae(overflowing, tmp_path):
    """The other way out, as with madebyollin/sdxl-vae-fp16-fix: export with ``vae=`` another
    (fp16-safe) VAE; everything in fp16 then gives finite images equal to diffusers with that VAE."""
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import tiny_vae

    fixed = tiny_vae(7, scaling_factor=0.13025, force_upcast=False)
    fixed.save_pretrained(str(tmp_path / "vae-fp16-fix"))
    export_bundle(None, tmp_path / "b", pipe=overflowing, precision="fp16", check=False, progress=lambda *_: None,
                  vae=tmp_path / "vae-fp16-fix")
    assert overflowing.vae is not fixed and overflowing.vae.decoder.conv_in.weight.abs().max() > 1e3  # unchanged
    ours = latentrt.load(tmp_path / "b")
    assert {e.precision for e in ours.bundle.manifest.components.values()} == {"fp16"}
    assert ours.bundle.manifest.extra["vae"]["path"] == str((tmp_path / "vae-fp16-fix").resolve())
    ref = type(overflowing)(**{**overflowing.components, "vae": fixed})
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red fox in the snow", num_inference_steps=2, output_type="np")
    got = ours(**kw, generator=TorchGeneratorNoise(1)).images
    want = ref(**kw, generator=torch.Generator().manual_seed(1)).images
    assert np.isfinite(got).all() and float(got.std()) > 1e-2
    err = float(np.abs(got - want).max())
    assert err <= FP16_TOL, f"max abs image difference {err:.3g} > {FP16_TOL}"


def test_vae_swap_refuses_a_vae_of_another_family(overflowing):
    from latentrt.export.tiny import tiny_vae
    from latentrt.export.vae_swap import swap_vae

    with pytest.raises(ValueError, match="latent_channels=16 but the pipeline's has 4"):
        swap_vae(overflowing, tiny_vae(7, latent_channels=16))
