"""Scenario tasks (latentrt.bench.tasks): the seeded input image, the calls both systems get, and the
bad-input cases: an unknown task, options a task cannot take, a task whose model does not fit."""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.bench.scenarios import Scenario, load_scenarios
from latentrt.bench.tasks import input_image, latentrt_kwargs, pipe_kwargs


def test_input_image_is_fixed_by_the_seed():
    up = Scenario(task="upscale", height=256, width=192, seed=3)
    a, b = np.asarray(input_image(up)), np.asarray(input_image(up))
    assert a.shape == (128, 96, 3) and a.dtype == np.uint8 and np.array_equal(a, b)  # half the output size
    assert a.std() > 20  # a picture, not a flat field
    other = np.asarray(input_image(Scenario(task="upscale", height=256, width=192, seed=4)))
    assert np.abs(other.astype(int) - a).mean() > 5
    assert np.asarray(input_image(Scenario(task="unclip-variation", height=64, width=96))).shape == (64, 96, 3)
    assert input_image(Scenario(task="unclip")) is None and input_image(Scenario()) is None


def test_calls_of_each_task():
    t2i = pipe_kwargs(Scenario(batch=2))
    assert t2i == dict(num_inference_steps=4, guidance_scale=8.0, output_type="np", height=512, width=512,
                       num_images_per_prompt=2)
    up = pipe_kwargs(Scenario(task="upscale", height=128, width=128, guidance=0.0))
    assert "height" not in up and "num_images_per_prompt" not in up and up["image"].size == (64, 64)
    assert latentrt_kwargs(Scenario(task="upscale", vae_tiling=True))["vae_tiling"] is True
    assert "vae_tiling" not in latentrt_kwargs(Scenario(task="upscale"))
    assert latentrt_kwargs(Scenario(vae="tiny"))["vae"] == "tiny"


def test_baseline_calls():
    from latentrt.bench.harness import baseline_calls, planned_calls

    sc = Scenario(warmup=1, repeats=2, cold_start=False)
    assert baseline_calls(sc, "diffusers") == 3 and planned_calls(sc) == 6
    once = Scenario(warmup=1, repeats=2, baseline_warmup=0, baseline_repeats=1, flops=False, cold_start=False)
    assert baseline_calls(once, "diffusers") == 1 and planned_calls(once) == 4
    assert baseline_calls(Scenario(warmup=0, repeats=1, cold_start=False), "diffusers") == 2  # + the FLOPs call
    with pytest.raises(ValueError, match="baseline_repeats must be an integer >= 1"):
        Scenario(baseline_repeats=0)
    with pytest.raises(ValueError, match="baseline_warmup must be an integer >= 0"):
        Scenario(baseline_warmup=-1)
    with pytest.raises(ValueError, match="flops must be true or false"):
        Scenario(flops="no")


def test_task_in_a_scenario_file(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[defaults]\ntask = "upscale"\nguidance = 0.0\n[[scenario]]\nname = "a"\n'
                 '[[scenario]]\nname = "b"\nvae_tiling = true\n')
    a, b = load_scenarios(f)
    assert (a.task, a.vae_tiling, b.vae_tiling) == ("upscale", False, True)


@pytest.mark.parametrize("kw, message", [
    (dict(task="inpaint"), r"unknown task 'inpaint'; known: \['text-to-image', 'unclip', 'unclip-variation', 'upscale'\]"),
    (dict(task="upscale", vae="tiny"), r"task 'upscale' runs the full VAE only .*set vae = \"full\""),
    (dict(task="unclip", baseline_vae="tiny"), r"task 'unclip' runs the full VAE only"),
    (dict(task="upscale", batch=2), r"task 'upscale' makes one image per input image; set batch = 1"),
    (dict(task="unclip", quality_samples=8), r"set quality_samples = 0 for task 'unclip'"),
    (dict(task="unclip-variation", baselines=["diffusers", "optimum-intel"]), r"peers \['optimum-intel'\] run text-to-image only"),
    (dict(vae_tiling="yes"), r"vae_tiling must be true or false; got 'yes'"),
    (dict(vae="tiny", vae_tiling=True), r"vae_tiling tiles the full VAE, not TAESD"),
])
def test_bad_scenarios(kw, message):
    with pytest.raises(ValueError, match=message):
        Scenario(name="s", **kw)


def test_task_whose_model_does_not_fit(taesd_bundle, upscaler_bench_bundle, tmp_path):
    """Refused before anything is measured or written, naming the bundle's kind and the task that fits."""
    from latentrt.bench.harness import run_benchmarks

    out = tmp_path / "r.jsonl"
    cases = [(Scenario(name="up", model=str(taesd_bundle), task="upscale", baselines=[]),
              r"task 'upscale' does not run model .*, a 'lcm' bundle; set task = 'text-to-image'"),
             (Scenario(name="t2i", model=str(upscaler_bench_bundle), baselines=[]),
              r"task 'text-to-image' does not run model .*, a 'latent_upscale' bundle; set task = 'upscale'")]
    for sc, message in cases:
        ok = Scenario(name="fine", model=str(taesd_bundle), baselines=[], height=64, width=64, repeats=1)
        with pytest.raises(ValueError, match=message):
            run_benchmarks([ok, sc], out_path=out, progress=False, gemm=False)
        assert not out.exists()  # the scenario before it did not run either


def test_cli_task_option(upscaler_bench_bundle, tmp_path):
    from latentrt.cli import main

    out = tmp_path / "r.jsonl"
    assert main(["bench", "--model", str(upscaler_bench_bundle), "--task", "upscale", "--height", "128", "--width",
                 "128", "--steps", "1", "--guidance", "0", "--warmup", "0", "--repeats", "1", "--vae-tiling",
                 "--no-baseline", "--no-cold-start", "--no-isolated-memory", "--no-gemm", "--no-progress",
                 "-o", str(out)]) == 0
    import json

    rec = json.loads(out.read_text().splitlines()[1])
    assert rec["settings"]["task"] == "upscale" and rec["settings"]["vae_tiling"] is True
    assert rec["stages"]["vae_decoder"]["calls"] > 1  # tiled


def test_shipped_seed_pipeline_scenarios_load():
    import os

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    scen = load_scenarios(os.path.join(repo, "benchmarks/scenarios/upscale_unclip_cpu.toml"))
    assert {s.task for s in scen} == {"upscale", "unclip", "unclip-variation"}
    assert all(s.isolate and s.backend == "openvino" and s.engine_options["precision"] == "fp32" for s in scen)
    up = [s for s in scen if s.task == "upscale"]
    assert {s.steps for s in up} == {20, 5} and any(s.vae_tiling for s in up)
    assert all((s.height, s.width, s.guidance) == (1024, 1024, 0.0) for s in up)
    assert all((s.height, s.width) == (768, 768) for s in scen if s.task != "upscale")
