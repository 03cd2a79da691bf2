"""Export round trips: manifest contents, dynamic shapes, external data, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import latentrt
from latentrt.export import bundle as bundle_mod
from latentrt.export import onnx_export
from latentrt.export.bundle import export_bundle
from latentrt.manifest import MANIFEST_NAME, read_manifest, sha256_file

QUIET = dict(progress=lambda *_: None)


def test_manifest_describes_every_component(lcm_bundle):
    m = read_manifest(lcm_bundle)
    assert m.pipeline == "lcm"
    assert set(m.components) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    unet = m.components["unet"]
    assert [s.name for s in unet.spec.inputs] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet.spec.inputs[0].shape == ("B", 4, "H/8", "W/8")
    assert unet.spec.inputs[3].shape == ("B", 32)  # time_cond_proj_dim of the tiny LCM
    for name, entry in m.components.items():
        for rel, digest in entry.files.items():
            assert sha256_file(lcm_bundle / rel) == digest
        assert entry.parity["max_rel"] <= entry.parity["tolerance"] == 1e-3
        assert len(entry.parity["sizes"]) == 2  # checked at two sizes, batch 1 and 2
    k = m.constants
    assert (k["vae_scale_factor"], k["vae_scaling_factor"], k["time_cond_proj_dim"]) == (8, 0.18215, 32)
    assert k["default_height"] == 64 and k["size_multiple"] == 8  # every multiple of the VAE factor
    assert (k["min_size"], k["max_size"], k["max_batch"]) == (16, 256, 16)  # 2-level UNet; 4x the default size
    assert {"torch", "diffusers", "transformers", "onnx", "latentrt"} <= set(m.tools)
    for f in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"):
        assert (lcm_bundle / f).is_file()


def test_dynamic_batch_and_size(lcm_bundle):
    sess = ort.InferenceSession(str(lcm_bundle / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b, h, w in [(1, 8, 8), (3, 6, 10), (2, 16, 4)]:
        out = sess.run(None, {
            "sample": rng.standard_normal((b, 4, h, w)).astype(np.float32),
            "timestep": np.full(b, 500, np.float32),
            "encoder_hidden_states": rng.standard_normal((b, 77, 32)).astype(np.float32),
            "timestep_cond": rng.standard_normal((b, 32)).astype(np.float32),
        })[0]
        assert out.shape == (b, 4, h, w)


def test_fp16_bundle_records_dtypes(lcm_bundle_fp16):
    m = read_manifest(lcm_bundle_fp16)
    assert m.precision == "fp16"
    unet = {s.name: s.dtype for s in m.components["unet"].spec.inputs}
    assert unet == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
                    "timestep_cond": "float16"}
    assert m.components["text_encoder"].spec.inputs[0].dtype == "int64"
    for entry in m.components.values():
        assert entry.parity["tolerance"] == 5e-2 and entry.parity["max_rel"] < 5e-2


def test_external_data_round_trip(tiny_lcm_dir, lcm_bundle, tmp_path, monkeypatch):
    """Weights above the threshold go to model.onnx_data (what a 3.4 GB SD UNet needs)."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    export_bundle(tiny_lcm_dir, out, **QUIET)
    m = read_manifest(out)
    assert set(m.components["unet"].files) == {"unet/model.onnx", "unet/model.onnx_data"}
    graph, data = ((out / "unet" / f).stat().st_size for f in ("model.onnx", "model.onnx_data"))
    assert graph < 0.2 * data  # only tensors under 1 KiB stay inline
    a = latentrt.load(out)("a cat", num_inference_steps=2, generator=0, output_type="np").images
    b = latentrt.load(lcm_bundle)("a cat", num_inference_steps=2, generator=0, output_type="np").images
    assert np.abs(a - b).max() < 1e-6


def _no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name == name]


def test_interrupted_export_leaves_nothing(tiny_lcm_dir, tmp_path, monkeypatch):
    real = bundle_mod.export_component
    calls = []

    def interrupt_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-export
        return real(*args, **kwargs)

    monkeypatch.setattr(bundle_mod, "export_component", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_lcm_dir, tmp_path / "out", **QUIET)
    assert len(calls) == 3
    assert _no_leftovers(tmp_path, "out") == []


def test_export_failing_parity_leaves_nothing(tiny_lcm_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(onnx_export.TOLERANCE, "fp32", 1e-12)
    with pytest.raises(onnx_export.ExportError, match=r"text_encoder: ONNX disagrees with torch .* tolerance 1e-12"):
        export_bundle(tiny_lcm_dir, tmp_path / "out", **QUIET)
    assert _no_leftovers(tmp_path, "out") == []


def test_existing_output_needs_overwrite(tiny_lcm_dir, lcm_bundle, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle(tiny_lcm_dir, out, **QUIET)
    assert (out / "keep.txt").exists()
    export_bundle(tiny_lcm_dir, out, overwrite=True, check=False, **QUIET)
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert _no_leftovers(tmp_path, "b") == ["b"]
    assert json.loads((out / MANIFEST_NAME).read_text())["pipeline"] == "lcm"


def test_missing_local_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        export_bundle(tmp_path / "does-not-exist", tmp_path / "out", **QUIET)


def test_second_load_uses_optimized_model_cache(lcm_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTRT_CACHE", str(tmp_path / "cache"))
    first = latentrt.load(lcm_bundle)
    assert not any(e.cache_hit for e in first.engines.values())
    second = latentrt.load(lcm_bundle)
    assert all(e.cache_hit for e in second.engines.values())
    a = first("a cat", num_inference_steps=2, generator=1, output_type="np").images
    b = second("a cat", num_inference_steps=2, generator=1, output_type="np").images
    assert np.abs(a - b).max() < 1e-6
