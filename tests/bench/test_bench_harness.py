"""The benchmark harness on the tiny LCM bundle: statistics, scenarios, the JSON-lines schema,
report generation and the `latentrt bench` / `latentrt report` commands (seconds, not minutes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from latentrt.bench import SCHEMA
from latentrt.bench.report import Check, read_results, target_checks, write_report
from latentrt.bench.scenarios import Scenario, load_scenarios, make_scenario
from latentrt.bench.stats import percentile, psnr, summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUMMARY_KEYS = {"n", "mean", "std", "min", "median", "p90", "p99", "max"}


# -- statistics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 10, 101])
def test_percentiles_match_numpy(n):
    xs = np.random.default_rng(n).exponential(size=n).tolist()
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-15)
    s = summarize(xs)
    assert set(s) == SUMMARY_KEYS and s["n"] == n
    assert s["median"] == pytest.approx(float(np.median(xs)))
    assert s["std"] == pytest.approx(float(np.std(xs)))


def test_statistics_bad_input():
    with pytest.raises(ValueError, match="at least one repeat"):
        summarize([])
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\]"):
        percentile([1.0], 120)


def test_psnr():
    a = np.zeros((1, 4, 4, 3))
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="different shapes"):
        psnr(a, a[:, :2])


# -- scenarios ------------------------------------------------------------------------------------
def test_shipped_scenario_files_load():
    scen = load_scenarios(os.path.join(REPO, "benchmarks/scenarios/sd15_lcm_cpu.toml"))
    assert [s.vae for s in scen] == ["full", "tiny", "full", "tiny"]
    assert [s.backend for s in scen] == ["onnxruntime", "onnxruntime", "openvino", "openvino"]
    assert all((s.height, s.width, s.steps, s.batch, s.model) == (512, 512, 4, 1, "sd15-lcm") for s in scen)
    assert scen[1].resolved_baseline_vae == "full" and scen[0].resolved_baseline_precision == "fp32"
    names = sorted(n for n in os.listdir(os.path.join(REPO, "benchmarks/scenarios")) if n.endswith(".toml"))
    assert {"tiny_lcm_smoke.toml", "sd15_lcm_cuda.toml", "sd15_lcm_int8_vae.toml"} <= set(names)
    for name in names:  # every shipped file parses and checks
        assert load_scenarios(os.path.join(REPO, "benchmarks/scenarios", name)), name
    over = load_scenarios(os.path.join(REPO, "benchmarks/scenarios/sd15_lcm_cpu.toml"), {"height": 256},
                          ["sd15-512-4steps-taesd"])
    assert [(s.name, s.height) for s in over] == [("sd15-512-4steps-taesd", 256)]


def test_scenario_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['heigth'\]"):
        make_scenario({"heigth": 512})
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        Scenario(steps=0)
    with pytest.raises(ValueError, match="vae must be one of"):
        Scenario(vae="taesd")
    bad = tmp_path / "bad.toml"
    bad.write_text("[defaults]\nsteps = 4\n")
    with pytest.raises(ValueError, match=r"no \[\[scenario\]\] tables"):
        load_scenarios(bad)
    with pytest.raises(FileNotFoundError, match="no such scenario file"):
        load_scenarios(tmp_path / "missing.toml")


def test_full_size_configs_have_the_published_sizes():
    """The random SD1.5 LCM components have exactly the parameter counts of the published models."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentrt.bench import models as M

    def count(make):
        with torch.device("meta"):
            return sum(p.numel() for p in make().parameters())

    # SD1.5 UNet 859,520,964 + the LCM guidance projection Linear(256, 320, bias=False)
    assert count(lambda: UNet2DConditionModel(**M.SD15_LCM_UNET)) == 859_520_964 + 256 * 320
    assert count(lambda: CLIPTextModel(CLIPTextConfig(**M.CLIP_VIT_L14_TEXT))) == 123_060_480
    assert count(lambda: AutoencoderKL(**M.SD_VAE)) == 83_653_863
    assert count(lambda: AutoencoderTiny(**M.TAESD)) == 2_445_063


# -- the harness end to end on the tiny bundle --------------------------------------------------
@pytest.fixture(scope="module")
def results_file(taesd_bundle, tmp_path_factory):
    from latentrt.bench.harness import run_benchmarks

    out = tmp_path_factory.mktemp("bench") / "results.jsonl"
    common = dict(model=str(taesd_bundle), height=64, width=64, steps=2, threads=2, warmup=1, repeats=3, targets=True)
    scen = [Scenario(name="full", **common), Scenario(name="taesd", vae="tiny", baseline_vae="full", **common)]
    run_benchmarks(scen, out_path=out, progress=False, gemm=False)
    return out


def test_result_lines_schema(results_file, taesd_bundle):
    lines = [json.loads(x) for x in results_file.read_text().splitlines()]
    env, results = lines[0], lines[1:]
    assert env["type"] == "env" and env["schema"] == SCHEMA
    assert {"cpu", "threads", "memory", "libraries", "python"} <= set(env)
    assert env["cpu"]["usable_cpus"] >= 1 and "onnxruntime" in env["libraries"]
    assert [(r["scenario"], r["system"]) for r in results] == [
        ("full", "latentrt"), ("full", "diffusers"), ("taesd", "latentrt"), ("taesd", "diffusers")]
    for r in results:
        assert r["schema"] == SCHEMA and r["run_id"] == env["run_id"]
        assert set(r["e2e"]) == SUMMARY_KEYS and r["e2e"]["n"] == 3 and len(r["e2e_samples"]) == 3
        assert r["e2e"]["min"] <= r["e2e"]["median"] <= r["e2e"]["p90"] <= r["e2e"]["p99"] <= r["e2e"]["max"]
        assert r["stages"]["unet"]["calls"] == 2 and set(r["stages"]["unet"]["per_call"]) == SUMMARY_KEYS
        assert r["engine_total"]["median"] <= r["e2e"]["median"] + 1e-9
        assert 0 <= r["overhead"]["fraction_median"] < 1
        mem = r["memory"]
        assert mem["peak_rss_bytes"] >= mem["rss_before_bytes"] > 0 and mem["weight_bytes"] > 0
        assert r["bundle"]["hash"] and r["settings"]["height"] == 64
    ours_full, base_full, ours_tiny, base_tiny = results
    iso = ours_full["memory"]["isolated"]  # the runtime alone, in a fresh process
    assert iso["peak_rss_bytes"] > iso["rss_after_imports_bytes"] > 0 and iso["torch_imported"] is False
    assert iso["weight_bytes"] == ours_full["memory"]["weight_bytes"]
    assert "text_encoder" in ours_full["stages"] and "vae_decoder" in ours_full["stages"]
    assert "tiny_vae_decoder" in ours_tiny["stages"] and "vae_decoder" not in ours_tiny["stages"]
    assert base_tiny["vae"] == "full" and base_tiny.get("reused")  # measured once, reused
    assert set(base_full["stages"]) == {"text_encoder", "unet", "vae_decoder"}
    assert base_full["flops"]["unet"] > 0 and base_full["flops"]["vae_decoder"] > 0
    cold = ours_full["cold_start"]
    assert cold["load_first_s"] > 0 and cold["load_second_s"] > 0 and cold["cold_start_s"] >= cold["load_first_s"]
    # same weights, same noise, fp32: latentrt's image is the diffusers image
    assert ours_full["quality"]["psnr_db"] > 60
    assert "quality" not in ours_tiny  # no TAESD reference in this run (its baseline uses the full VAE)


def test_report_written(results_file, tmp_path):
    md = write_report([results_file], tmp_path / "rep", command="latentrt bench ...")
    text = md.read_text()
    assert "## Results" in text and "## Targets" in text and "latentrt bench ..." in text
    for png in ("e2e.png", "stages.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"]({png})" in text
    checks = {(c["check"], c["scenario"]) for c in json.loads((tmp_path / "rep" / "checks.json").read_text())}
    assert {("e2e_speedup_full_vae", "full"), ("psnr_db", "full"), ("e2e_speedup_taesd_vs_diffusers_full", "taesd"),
            ("overhead_fraction", "full"), ("peak_rss_vs_weights", "full"), ("second_load_speedup", "full")} <= checks


def test_target_checks_margin_and_floor(results_file):
    envs, results = read_results([results_file])
    envs[0]["gemm"] = {"numpy_fp32_gflops": 100.0}  # a known rate: floor = FLOPs / 100 GFLOP/s
    unet = next(c for c in target_checks(envs, results) if c.name == "unet_step_vs_floor" and c.scenario == "full")
    ours = results[0]
    floor = results[1]["flops"]["unet"] / 100e9
    assert unet.value == pytest.approx(ours["stages"]["unet"]["per_call"]["median"] / floor)
    assert Check("x", "s", 1.0, ">=", 2.0).margin == "missed: needs 2.00x improvement"
    assert Check("x", "s", 4.0, ">=", 2.0).margin == "met with 2.00x headroom"
    assert Check("x", "s", 0.03, "<", 0.01).met is False
    assert Check("x", "s", None, "<", 0.01).margin == "not measured"


def test_a_near_miss_does_not_read_as_met():
    """1.4955 against >= 1.5 was shown as "1.5 ... missed: needs 1.00x improvement" (peers run of 2026-12-03): the
    value and the margin get the digits it takes to show which side of the target they are on."""
    from latentrt.bench.report import checks_table

    near = Check("e2e_speedup_vs_best_peer", "s", 1.4955, ">=", 1.5)
    assert near.met is False and near.shown == "1.496" and near.margin == "missed: needs 1.003x improvement"
    assert "| 1.496 | >= 1.5 | **missed** | missed: needs 1.003x improvement |" in checks_table([near])
    assert Check("x", "s", 1.5004, ">=", 1.5).shown == "1.5"  # met, and 1.5 reads as met
    assert Check("x", "s", 2.5004, "<=", 2.5).shown == "2.5004" and Check("x", "s", 2.5004, "<=", 2.5).met is False
    assert Check("x", "s", 5.97, "<=", 2.0).shown == "5.97"  # far from the target: 3 digits as before
    assert Check("x", "s", 1.0, ">=", 2.0).margin == "missed: needs 2.00x improvement"
    assert Check("x", "s", float("nan"), ">=", 2.0).margin == "not measured"


def test_read_results_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"schema": "other"}\n')
    with pytest.raises(ValueError, match="is not 'latentrt-bench/1'"):
        read_results([bad])
    with pytest.raises(FileNotFoundError, match="latentrt bench -o"):
        read_results([tmp_path / "none.jsonl"])


# -- the commands ---------------------------------------------------------------------------------
def _cli(*args, cwd):
    env = {**os.environ, "LATENTRT_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "latentrt.cli", *args], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=cwd,
                          env=env, timeout=300)


def test_cli_bench_and_report(taesd_bundle, tmp_path):
    r = _cli("bench", "--model", str(taesd_bundle), "--height", "64", "--width", "64", "--steps", "1", "--warmup", "0",
             "--repeats", "2", "--vae", "tiny", "--no-baseline", "--no-gemm", "--no-isolated-memory", "--no-progress",
             "-o", "out.jsonl",
             "--report", "rep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "latentrt" in r.stdout and "wrote rep/report.md" in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(x["type"], x.get("system")) for x in lines] == [("env", None), ("result", "latentrt")]
    assert lines[1]["e2e"]["n"] == 2 and "tiny_vae_decoder" in lines[1]["stages"]
    r = _cli("report", "out.jsonl", "-o", "rep2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep2" / "report.md").is_file() and (tmp_path / "rep2" / "e2e.png").is_file()


def test_cli_bench_errors(tmp_path):
    r = _cli("bench", "--scenario", "x", cwd=tmp_path)
    assert r.returncode == 2 and "pass --config too" in r.stderr
    r = _cli("bench", "--model", "nope-model", "--no-gemm", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "unknown benchmark model 'nope-model'" in r.stderr
