"""Mixed-precision export, checked numerically on ONNX Runtime CPU (see latentrt/export/precision.py
for why the graphs are traced from a half model rather than converted by ModelOpt AutoCast)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

import latentrt
from latentrt.manifest import read_manifest

FP16_IMAGE_TOL = 2e-2


def _image(bundle, **kw):
    pipe = latentrt.load(bundle)
    return pipe("a photograph of an astronaut riding a horse", num_inference_steps=4, guidance_scale=8.0,
                generator=0, output_type="np", **kw).images


@pytest.mark.parametrize("size", [dict(), dict(height=64, width=96)])
def test_fp16_bundle_image_matches_fp32(lcm_bundle, lcm_bundle_fp16, size):
    ref, got = _image(lcm_bundle, **size), _image(lcm_bundle_fp16, **size)
    assert np.isfinite(got).all(), "fp16 image has NaN/inf"
    assert ref.std() > 1e-2  # not a trivially constant image
    err = float(np.abs(got - ref).max())
    assert err <= FP16_IMAGE_TOL, f"fp16 vs fp32 image max abs diff {err:.3g} > {FP16_IMAGE_TOL}"


def test_manifest_records_io_dtypes(lcm_bundle_fp16):
    m = read_manifest(lcm_bundle_fp16)
    unet = m.components["unet"]
    dtypes = {s.name: s.dtype for s in (*unet.spec.inputs, *unet.spec.outputs)}
    assert unet.precision == "fp16"
    assert dtypes == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
                      "timestep_cond": "float16", "out_sample": "float16"}
    assert m.components["text_encoder"].spec.inputs[0].dtype == "int64"


def test_export_profile_sets_per_component_precision(monkeypatch, tmp_path):
    """`latentrt export --profile` passes the profile's precisions (CLI flags override them)."""
    import latentrt.export.bundle as bundle_mod
    from latentrt.commands import export as cmd

    seen = {}
    monkeypatch.setattr(bundle_mod, "export_bundle", lambda *a, **kw: seen.update(kw))
    prof = tmp_path / "p.toml"
    prof.write_text('dims = { B = 1, H = 512, W = 512 }\n[precision]\ndefault = "fp16"\nvae_decoder = "fp32"\n')

    def args(**kw):
        base = dict(src="x", output="y", precision=None, component_precision=[], revision=None, overwrite=False,
                    no_check=False, profile=str(prof))
        return argparse.Namespace(**{**base, **kw})

    cmd.run(args())
    assert seen["precision"] == "fp16" and seen["component_precision"] == {"vae_decoder": "fp32"}
    cmd.run(args(component_precision=["unet=fp32"]))
    assert seen["component_precision"] == {"vae_decoder": "fp32", "unet": "fp32"}
    cmd.run(args(profile=None))
    assert seen["precision"] == "fp32" and seen["component_precision"] == {}
