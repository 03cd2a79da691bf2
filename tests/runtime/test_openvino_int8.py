"""precision="int8" on the openvino backend (NNCF quantization of the UNet), on the tiny LCM.

The UNet IR is quantized once (int8 weights, FakeQuantize on activations), calibrated through the
pipeline, kept in the bundle's cache and reused by the next load; the other components run at the
bf16/fp32 compute hint. On the tiny random model the images stay within 30 dB of fp32 (measured
44-46 dB); full-size quality is the benchmark's quality gate (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'latentrt[cpu-fast]')")

import latentrt  # noqa: E402
from latentrt.bench.stats import psnr  # noqa: E402

CALL = dict(prompt="a photograph of an astronaut riding a horse", height=64, width=64, num_inference_steps=2,
            output_type="np")
CAL = {"prompts": 2, "steps": 2, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def int8_bundle(lcm_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "bundle"
    shutil.copytree(lcm_bundle, out, ignore=shutil.ignore_patterns(".cache"))
    return out


def test_int8_unet_is_quantized_cached_and_close(int8_bundle, monkeypatch):
    pipe = latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration=CAL)
    unet = pipe.engines["unet"]
    assert unet.precision == "int8" and unet.cache_path.name.startswith("unet-int8-")
    model = ov.Core().read_model(str(unet.cache_path))
    ops = Counter(op.get_type_name() for op in model.get_ops())
    consts = Counter(str(op.get_element_type()) for op in model.get_ops() if op.get_type_name() == "Constant")
    assert ops["FakeQuantize"] > 0, "no activation was quantized"
    assert consts["<Type: 'uint8_t'>"] + consts["<Type: 'int8_t'>"] > 0, "no weight was stored in int8"
    # the CPU engine's convolutions take unsigned input without a zero point (openvino_u8conv)
    lows = [op.input_value(0).get_node().input_value(3).get_node().get_data().min() for op in model.get_ops()
            if op.get_type_name() == "Convolution" and op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    assert lows and min(lows) == 0.0, lows
    sidecar = json.loads(unet.cache_path.with_suffix(".json").read_text())
    assert sidecar["unsigned_convolutions"] == len(lows) and sidecar["groupnorm"] is False
    image = pipe(**CALL, generator=0).images
    reference = latentrt.load(int8_bundle, backend="openvino", precision="fp32")(**CALL, generator=0).images
    assert np.isfinite(image).all() and psnr(image, reference) >= 30.0
    # the second load maps the cached IR: no calibration run
    from latentrt.runtime.engines import openvino_int8

    monkeypatch.setattr(openvino_int8, "calibration_samples", lambda *a, **k: pytest.fail("calibrated again"))
    stamp = unet.cache_path.stat().st_mtime_ns
    again = latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration=CAL)
    assert again.engines["unet"].cache_path == unet.cache_path and unet.cache_path.stat().st_mtime_ns == stamp
    # other calibration settings are another model
    other = openvino_int8.calibration_settings(again.bundle, {**CAL, "prompts": 3})
    assert other != openvino_int8.calibration_settings(again.bundle, CAL)


def test_int8_calibration_errors(int8_bundle):
    with pytest.raises(ValueError, match="int8_calibration: unknown keys"):
        latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration={"size": 3})
    with pytest.raises(ValueError, match="prompts must be 1..8"):
        latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration={"prompts": 0})


def test_int8_vae_decoder(int8_bundle):
    """int8_components=("vae_decoder",): the VAE decoder is quantized (calibrated on the latents the pipeline
    decodes), the UNet is not, the image stays close to fp32, and its compiled models never share a cache
    key with the same decoder left unquantized at precision int8."""
    pipe = latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration=CAL,
                         int8_components=("vae_decoder",), shapes="static")
    dec, unet = pipe.engines["vae_decoder"], pipe.engines["unet"]
    assert dec.cache_path.name.startswith("vae_decoder-int8-") and "int8" not in unet.cache_path.name
    assert dec.compute_precision == "int8" and unet.compute_precision in ("bf16", "fp32")  # what the report shows
    ops = Counter(op.get_type_name() for op in ov.Core().read_model(str(dec.cache_path)).get_ops())
    assert ops["FakeQuantize"] > 0 and ops["Convolution"] > 0
    image = pipe(**CALL, generator=0).images
    reference = latentrt.load(int8_bundle, backend="openvino", precision="fp32")(**CALL, generator=0).images
    assert np.isfinite(image).all() and psnr(image, reference) >= 30.0
    plain = latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration=CAL, shapes="static")
    plain(**CALL, generator=0)
    assert "int8" not in plain.engines["vae_decoder"].cache_path.name
    assert plain.engines["vae_decoder"].compilations[-1]["cache_dir"] != dec.compilations[-1]["cache_dir"]
    assert plain.engines["unet"].compilations[-1]["cache_dir"] != unet.compilations[-1]["cache_dir"]


def _activation_quantized_matmuls(model) -> int:
    """MatMuls with a weight whose other (activation) input comes through a FakeQuantize."""
    def weight(value) -> bool:
        node = value.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Subtract", "Multiply"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    count = 0
    for op in model.get_ops():
        if op.get_type_name() == "MatMul":
            ins = [op.input_value(i) for i in range(2)]
            if any(weight(v) for v in ins) and any(v.get_node().get_type_name() == "FakeQuantize" for v in ins):
                count += 1
    return count


def test_int8_method_full_and_hybrid(int8_bundle):
    """int8_method: "full" (the default) quantizes the weighted MatMuls' activations too, "hybrid" keeps
    them bf16 with int8 weights; each is its own cached IR, and both images stay close to fp32."""
    full = latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration=CAL)
    hybrid = latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration=CAL,
                           int8_method="hybrid")
    f, h = full.engines["unet"].cache_path, hybrid.engines["unet"].cache_path
    assert f != h and f.name.startswith("unet-int8-") and h.name.startswith("unet-int8-")
    core = ov.Core()
    assert _activation_quantized_matmuls(core.read_model(str(f))) > 0
    assert _activation_quantized_matmuls(core.read_model(str(h))) == 0
    hybrid_consts = Counter(str(op.get_element_type()) for op in core.read_model(str(h)).get_ops()
                            if op.get_type_name() == "Constant")
    assert hybrid_consts["<Type: 'uint8_t'>"] + hybrid_consts["<Type: 'int8_t'>"] > 0
    reference = latentrt.load(int8_bundle, backend="openvino", precision="fp32")(**CALL, generator=0).images
    for pipe in (full, hybrid):
        image = pipe(**CALL, generator=0).images
        assert np.isfinite(image).all() and psnr(image, reference) >= 30.0


def test_int8_method_values(int8_bundle):
    from latentrt.runtime.engines.openvino_int8 import int8_method

    assert int8_method(None) == "full" and int8_method("hybrid") == "hybrid"
    for bad in ("smooth", "", 8):
        with pytest.raises(ValueError, match=r"int8_method must be one of \['full', 'hybrid'\]"):
            int8_method(bad)
    with pytest.raises(ValueError, match="int8_method must be one of"):  # checked whatever the precision
        latentrt.load(int8_bundle, backend="openvino", precision="fp32", int8_method="Full")


@pytest.mark.parametrize("value", ["text_encoder", (), ("unet", "vae"), 3])
def test_int8_components_errors(int8_bundle, value):
    with pytest.raises(ValueError, match=r"int8_components must name one or more of \['unet', 'vae_decoder'\]"):
        latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_components=value)


def test_int8_components_values():
    from latentrt.runtime.engines.openvino_int8 import int8_components

    assert int8_components(None) == ("unet",)
    assert int8_components("vae_decoder") == ("vae_decoder",)
    assert int8_components("unet, vae_decoder") == ("unet", "vae_decoder")  # --engine-option int8_components=a,b
    assert int8_components(["vae_decoder"]) == ("vae_decoder",)  # a TOML list
    with pytest.raises(ValueError, match="int8_components"):
        int8_components("")


def test_no_floor_is_claimed_for_int8():
    from latentrt.bench.env import floor_rate_gflops

    gemm = {"numpy_fp32_gflops": 200.0, "torch_fp32_gflops": 150.0, "torch_bf16_gflops": 900.0}
    assert floor_rate_gflops(gemm, "bf16") == 900.0 and floor_rate_gflops(gemm, "fp32") == 200.0
    assert floor_rate_gflops(gemm, "int8") is None  # no int8 GEMM probe: an fp32 rate would be no floor


def test_cached_int8_load_does_not_import_nncf(int8_bundle):
    """A load that finds its int8 IR cached needs no NNCF: a new process loads and runs without importing
    it (``import nncf`` takes seconds, all of it a new process's start-up)."""
    import json
    import subprocess
    import sys

    latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration=CAL)  # cached from here on
    code = ("import sys, json, latentrt\n"
            f"p = latentrt.load({str(int8_bundle)!r}, backend='openvino', precision='int8', int8_calibration={CAL!r})\n"
            f"p(**{CALL!r}, generator=0)\n"
            "print(json.dumps({'nncf': any(m == 'nncf' or m.startswith('nncf.') for m in sys.modules), "
            "'quantized': p.engines['unet'].compute_precision}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"nncf": False, "quantized": "int8"}


def test_int8_without_nncf_says_what_to_install(int8_bundle, monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ImportError, match=r"needs NNCF .*pip install 'latentrt\[cpu-fast\]'"):
        latentrt.load(int8_bundle, backend="openvino", precision="int8", int8_calibration=CAL)


def test_int8_both_components_calibrate_once_one_at_a_time(lcm_bundle, tmp_path, monkeypatch):
    """int8_components=("unet", "vae_decoder"): the engines are created in parallel threads, but the two
    calibrations run one after the other (each holds a pipeline and NNCF's f32 statistics model), from one
    calibration run of the pipeline that records both components' inputs, and that pipeline is freed before
    NNCF runs."""
    import threading
    import weakref

    from latentrt.runtime import loader
    from latentrt.runtime.engines import openvino_int8

    bundle = tmp_path / "bundle"
    shutil.copytree(lcm_bundle, bundle, ignore=shutil.ignore_patterns(".cache"))
    runs, pipes, active, overlaps = [], [], [0], []
    lock = threading.Lock()
    real_record, real_quantize, real_load = openvino_int8.recorded_inputs, openvino_int8.quantize, loader.load

    def record(bundle_, components, cal, threads):
        runs.append(tuple(components))
        out = real_record(bundle_, components, cal, threads)
        assert pipes and pipes[-1]() is None, "the calibration pipeline outlived its run"
        return out

    def load(*a, **k):
        pipe = real_load(*a, **k)
        pipes.append(weakref.ref(pipe))
        return pipe

    def quantize(*a, **k):
        with lock:
            active[0] += 1
            overlaps.append(active[0])
        try:
            return real_quantize(*a, **k)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(openvino_int8, "recorded_inputs", record)
    monkeypatch.setattr(openvino_int8, "quantize", quantize)
    monkeypatch.setattr(loader, "load", load)
    pipe = latentrt.load(bundle, backend="openvino", precision="int8", int8_calibration=CAL,
                         int8_components=("unet", "vae_decoder"), shapes="static")
    assert sorted(overlaps) == [1, 1], overlaps  # two quantizations, never two at once
    assert len(runs) == 1 and sorted(runs[0]) == ["unet", "vae_decoder"], runs  # one pipeline run for both
    inner = [p for p in pipes if p() is not pipe]  # latentrt.load is the loader's too: the outer pipe is in pipes
    assert len(inner) == 1 and inner[0]() is None, "the calibration pipeline is still alive"
    assert not openvino_int8._pending  # every recorded input was taken
    for c in ("unet", "vae_decoder"):
        e = pipe.engines[c]
        assert e.compute_precision == "int8" and e.cache_path.name.startswith(f"{c}-int8-")
        assert json.loads(e.cache_path.with_suffix(".json").read_text())["samples"] == (4 if c == "unet" else 2)
    image = pipe(**CALL, generator=0).images
    reference = latentrt.load(bundle, backend="openvino", precision="fp32")(**CALL, generator=0).images
    assert np.isfinite(image).all() and psnr(image, reference) >= 30.0
