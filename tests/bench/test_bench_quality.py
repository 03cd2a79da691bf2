"""The benchmark's quality gate (``quality_samples``): latentrt against diffusers fp32 over several
prompts and seeds, per image PSNR and mean absolute pixel error, and a verdict in the record and the
report; in-process and with each system in its own process."""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.bench.quality import gate_calls, gate_result, split_gate, with_gate
from latentrt.bench.scenarios import Scenario


def test_gate_helpers():
    sc = Scenario(quality_samples=10, seed=3)
    calls = gate_calls(sc)
    assert len(calls) == 10 and len({s for _, s in calls}) == 10 and calls[8][0] == calls[0][0]
    first, gate = np.zeros((2, 4, 4, 3)), [np.ones((1, 4, 4, 3)) * i / 4 for i in range(3)]
    joined, n = with_gate(first, gate)
    a, b = split_gate(joined, n)
    assert np.array_equal(a, first) and b.shape == (3, 4, 4, 3)
    ref = np.full((2, 4, 4, 3), 0.5)
    ours = ref.copy()
    ours[1] += 0.1  # 20 dB, 25.5/255 off
    r = gate_result(ours, ref, 30.0)
    assert r["psnr_min_db"] == pytest.approx(20.0) and r["mean_abs_error_255_max"] == pytest.approx(25.5)
    assert not r["passed"] and r["verdict"].startswith("not recommended")
    assert gate_result(ref, ref, 30.0)["passed"]
    with pytest.raises(ValueError, match="quality_samples compares with diffusers"):
        Scenario(quality_samples=2, baselines=())


@pytest.mark.parametrize("isolate", [False, True])
def test_gate_through_the_harness(taesd_bundle, tmp_path, isolate):
    from latentrt.bench.harness import run_benchmarks
    from latentrt.bench.report import target_checks, write_report

    out = tmp_path / "o.jsonl"
    common = dict(model=str(taesd_bundle), height=64, width=64, steps=2, warmup=0, repeats=1, cold_start=False,
                  isolated_memory=False, quality_samples=2, isolate=isolate, threads=1)
    recs = run_benchmarks([Scenario(name="fp32", **common), Scenario(name="strict", quality_gate_db=500.0, **common)],
                          out_path=out, progress=False, gemm=False)
    ours = {r["scenario"]: r for r in recs if r.get("system") == "latentrt"}
    gate = ours["fp32"]["quality"]["gate"]
    assert gate["samples"] == 2 and gate["passed"] and gate["psnr_min_db"] >= 60  # fp32 ONNX Runtime vs torch fp32
    assert len(gate["mean_abs_error_255"]) == 2 and max(gate["mean_abs_error_255"]) < 0.1
    assert not ours["strict"]["quality"]["gate"]["passed"]
    assert "gate_images" not in ours["fp32"]
    checks = [c for c in target_checks([], [r for r in recs if r["type"] == "result"]) if c.name == "quality_gate_psnr_min_db"]
    assert [c.met for c in checks] == [True, False]
    md = write_report([out], tmp_path / "report").read_text()
    assert "(**not recommended**)" in md and "gate min" in md
    # the priming process (isolate only) is reported, with its own figures
    assert ("### Before measuring: the priming process" in md) is isolate
    if isolate:
        primed = ours["fp32"]["memory"]["primed"]
        from latentrt.bench.report import _mb, _ms

        assert "error" not in primed
        assert (f"| fp32 | {_ms(primed['load_s'])} | {_ms(primed['first_image_s'])} | {_mb(primed['peak_rss_bytes'])} |"
                in md)
