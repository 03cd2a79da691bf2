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


def test_fp16_text_encoder_stays_fp16(lcm_bundle_fp16):
    """Traced with eager attention, the fp16 text encoder keeps every weight in fp16 (with SDPA the
    exporter's fp32 causal mask promoted the attention, the residual stream and all later weights to
    fp32), and its only fp32 compute is the softmax the model itself runs in fp32."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(lcm_bundle_fp16 / "text_encoder" / "model.onnx"))
    float_inits = {i.name: i.data_type for i in model.graph.initializer
                   if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(i.dims) >= 1}
    assert float_inits and set(float_inits.values()) == {TensorProto.FLOAT16}, \
        sorted(n for n, t in float_inits.items() if t == TensorProto.FLOAT)
    to_fp32 = [n for n in model.graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)]
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes and len(to_fp32) <= len(softmaxes) + 1, [n.name for n in to_fp32]


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
