"""``precision="auto"`` on the openvino backend: bf16 only where it is measured faster than fp32 on this CPU
(AMX: bf16 without measuring; no BF16: fp32), measured once per machine and kept in a cache file."""

from __future__ import annotations

import json

import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")

from latentrt.runtime.engines import openvino_auto as auto  # noqa: E402

AVX512_ONLY = ("Intel(R) Xeon(R) Processor", {"avx512f", "avx512_bf16"})


def _never(*a, **k):
    raise AssertionError("the probe ran")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder, no verdict remembered by this process, a CPU with AVX512-BF16 and no AMX."""
    monkeypatch.setenv("LATENTRT_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "_memo", {})
    monkeypatch.setattr(auto, "cpu_flags", lambda: AVX512_ONLY)
    return tmp_path


def test_bf16_needs_a_clear_margin():
    assert auto.choose(1.0, 0.5) == "bf16"
    assert auto.choose(1.0, 0.9) == "fp32"  # within the margin: not worth bf16's rounding
    assert auto.choose(1.0, 1.6) == "fp32"


def test_no_bf16_means_fp32_and_amx_means_bf16_without_measuring(fresh, monkeypatch):
    assert auto.auto_precision(None, "CPU", {"FP32", "INT8"}, 2, measure_fn=_never) == "fp32"
    monkeypatch.setattr(auto, "cpu_flags", lambda: ("Xeon", {"avx512_bf16", "amx_bf16", "amx_tile"}))
    assert auto.auto_precision(None, "CPU", {"FP32", "BF16"}, 2, measure_fn=_never) == "bf16"
    assert not (fresh / auto.CACHE_NAME).exists()


def test_measured_once_per_machine_and_thread_count(fresh, monkeypatch):
    calls = []

    def slow_bf16(core, device, threads):
        calls.append(threads)
        return {"fp32": 1.0, "bf16": 1.6}

    assert auto.auto_precision(None, "CPU", {"BF16"}, 2, measure_fn=slow_bf16) == "fp32"
    data = json.loads((fresh / auto.CACHE_NAME).read_text())
    (key, entry), = data.items()
    assert key == auto.probe_key(ov.__version__, 2) and "openvino " + ov.__version__ in key
    assert entry["choice"] == "fp32" and entry["fp32_s"] == 1.0 and entry["bf16_s"] == 1.6
    monkeypatch.setattr(auto, "_memo", {})  # a new process reads the file
    assert auto.auto_precision(None, "CPU", {"BF16"}, 2, measure_fn=_never) == "fp32"
    assert auto.auto_precision(None, "CPU", {"BF16"}, 1, measure_fn=lambda *a: {"fp32": 1.0, "bf16": 0.4}) == "bf16"
    assert calls == [2] and len(json.loads((fresh / auto.CACHE_NAME).read_text())) == 2


def test_an_unreadable_cache_is_measured_again(fresh):
    (fresh / auto.CACHE_NAME).write_text("{not json")
    assert auto.auto_precision(None, "CPU", {"BF16"}, 2, measure_fn=lambda *a: {"fp32": 1.0, "bf16": 0.5}) == "bf16"
    assert json.loads((fresh / auto.CACHE_NAME).read_text())[auto.probe_key(ov.__version__, 2)]["choice"] == "bf16"


def test_the_real_probe_times_both_precisions():
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 in OpenVINO")
    times = auto.measure(core, "CPU", 1, repeats=2)
    assert set(times) == {"fp32", "bf16"} and all(0 < t < 10 for t in times.values())


@pytest.mark.parametrize("verdict", ["fp32", "bf16"])
def test_engines_compile_with_the_verdict(lcm_bundle, fresh, monkeypatch, verdict):
    from latentrt.runtime.bundle import Bundle

    monkeypatch.setattr(auto, "cpu_flags", lambda: AVX512_ONLY)
    caps = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in caps:
        pytest.skip("this CPU has no bf16 in OpenVINO: auto is fp32 without a verdict")
    (fresh / auto.CACHE_NAME).write_text(json.dumps({auto.probe_key(ov.__version__, 1): {"choice": verdict}}))
    engine = Bundle(lcm_bundle).engine("vae_decoder", "openvino", threads=1)
    assert engine.precision == verdict
    assert engine.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == ("bf16" if verdict == "bf16" else "f32")
