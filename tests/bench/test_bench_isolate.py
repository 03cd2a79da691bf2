"""The diffusers baseline for SDXL and process isolation of the benchmark harness, on tiny models.

* ``DiffusersBaseline`` runs the pipeline class the model folder declares: on a tiny LCM-SDXL folder it
  is ``StableDiffusionXLPipeline``, timed per stage like latentrt's SDXL pipeline, and with the same
  seed its image is latentrt's (fp32, max abs difference <= 1e-4), with the full VAE and with TAESD.
* ``isolate = true`` measures each system in its own child process: the records have the structure and
  the PSNR of an in-process run, carry the child's pid, and a failing child stops the run with an
  error that names the scenario, the system and the child's stderr.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from latentrt.bench.scenarios import Scenario, make_scenario

TOL = 1e-4
PROMPT = "a photograph of an astronaut riding a horse"


# -- SDXL in the diffusers baseline -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_lcm_bundle(tmp_path_factory):
    """A tiny LCM-SDXL diffusers folder, its TAESD, and the bundle exported from them."""
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import save_tiny_sdxl, save_tiny_taesd

    root = tmp_path_factory.mktemp("sdxl-lcm")
    folder = save_tiny_sdxl(root / "model", lcm=True)
    taesd = save_tiny_taesd(root / "taesd")
    export_bundle(folder, root / "bundle", tiny_vae=str(taesd), check=False, progress=lambda *_: None)
    return root / "bundle"


@pytest.mark.parametrize("vae", ["full", "tiny"])
def test_sdxl_baseline_matches_latentrt(sdxl_lcm_bundle, vae):
    import latentrt
    from latentrt.bench.baseline import DiffusersBaseline
    from latentrt.bench.models import model_folder_of, taesd_folder_of
    from latentrt.runtime.random import TorchGeneratorNoise

    ours = latentrt.load(sdxl_lcm_bundle)(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=8.0,
                                          generator=TorchGeneratorNoise(3), output_type="np", vae=vae)
    folder = model_folder_of(sdxl_lcm_bundle)
    base = DiffusersBaseline(folder, vae=vae, taesd=taesd_folder_of(sdxl_lcm_bundle), threads=1)
    images, timings = base(prompt=PROMPT, seed=3, height=64, width=64, num_inference_steps=2,
                             num_images_per_prompt=1, guidance_scale=8.0)
    assert type(base.pipe).__name__ == "StableDiffusionXLPipeline"
    assert base.pipe.unet.config.time_cond_proj_dim  # an LCM UNet: guidance embedding, no CFG
    assert images.shape == ours.images.shape == (1, 64, 64, 3)
    assert float(np.abs(images - ours.images).max()) <= TOL
    # the same stages, called as often, as latentrt's SDXL pipeline reports
    assert {k: len(v) for k, v in timings.items()} == {k: len(v) for k, v in ours.timings.items()}
    assert set(timings) == {"text_encoder", "text_encoder_2", "unet", f"{'tiny_' if vae == 'tiny' else ''}vae_decoder"}
    p = base.pipe
    expected = sum(t.numel() * t.element_size() for m in (p.text_encoder, p.text_encoder_2, p.unet, p.vae)
                   for t in [*m.parameters(), *m.buffers()])
    assert base.weight_bytes == expected
    assert type(p.vae).__name__ == ("AutoencoderTiny" if vae == "tiny" else "AutoencoderKL")
    base.close()


def test_lcm_baseline_with_taesd_matches_latentrt(taesd_bundle):
    """The SD1.5 LCM baseline keeps its pipeline class, and its TAESD swap gives latentrt's image."""
    import latentrt
    from latentrt.bench.baseline import DiffusersBaseline
    from latentrt.bench.models import model_folder_of, taesd_folder_of
    from latentrt.runtime.random import TorchGeneratorNoise

    ours = latentrt.load(taesd_bundle)(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=8.0,
                                       generator=TorchGeneratorNoise(5), output_type="np", vae="tiny")
    base = DiffusersBaseline(model_folder_of(taesd_bundle), vae="tiny", taesd=taesd_folder_of(taesd_bundle), threads=1)
    images, timings = base(prompt=PROMPT, seed=5, height=64, width=64, num_inference_steps=2,
                             num_images_per_prompt=1, guidance_scale=8.0)
    assert type(base.pipe).__name__ == "LatentConsistencyModelPipeline" and base.pipe.safety_checker is None
    assert float(np.abs(images - ours.images).max()) <= TOL
    assert {k: len(v) for k, v in timings.items()} == {k: len(v) for k, v in ours.timings.items()} == {
        "text_encoder": 1, "unet": 2, "tiny_vae_decoder": 1}
    base.close()


def test_baseline_pipeline_class_errors(tmp_path):
    from latentrt.bench.baseline import pipeline_class_name

    with pytest.raises(ValueError, match="not a diffusers model folder"):
        pipeline_class_name(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline"}))
    with pytest.raises(ValueError, match=r"not 'StableDiffusionUpscalePipeline'.*--no-baseline"):
        pipeline_class_name(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")  # no class name: the SD1.5 LCM baseline
    assert pipeline_class_name(tmp_path) == "LatentConsistencyModelPipeline"


# -- the isolate scenario key -------------------------------------------------------------------------
def test_isolate_key():
    assert Scenario().isolate is False
    assert make_scenario({"isolate": True}).isolate is True
    with pytest.raises(ValueError, match="isolate must be true or false; got 'yes'"):
        Scenario(isolate="yes")


def test_cli_isolate_flag():
    import argparse

    from latentrt.commands import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    (sc,) = bench.scenarios_from_args(parser.parse_args(["bench", "--model", "tiny-lcm", "--isolate"]))
    assert sc.isolate is True
    (sc,) = bench.scenarios_from_args(parser.parse_args(["bench", "--model", "tiny-lcm"]))
    assert sc.isolate is False


# -- isolated runs ------------------------------------------------------------------------------------
class CountingProgress:
    """Stands in for the harness's progress bar: counts the steps."""

    instances: list = []

    def __init__(self, total, enabled):
        self.total, self.steps, self.bar = total, 0, None
        CountingProgress.instances.append(self)

    def step(self, desc):
        self.steps += 1

    def note(self, desc):
        pass

    def close(self):
        pass


def _run(bundle, out, isolate: bool, monkeypatch):
    from latentrt.bench import harness

    monkeypatch.setattr(harness, "Progress", CountingProgress)
    common = dict(model=str(bundle), height=64, width=64, steps=2, threads=2, warmup=0, repeats=1, isolate=isolate,
                  isolated_memory=isolate)  # in-process: no memory probe (its own extra process)
    scen = [Scenario(name="full", **common), Scenario(name="taesd", vae="tiny", baseline_vae="full", **common)]
    records = harness.run_benchmarks(scen, out_path=out, progress=True, gemm=False)
    bar = CountingProgress.instances[-1]
    assert bar.steps == bar.total == sum(harness.planned_calls(s) for s in scen)
    assert [json.loads(x) for x in out.read_text().splitlines()] == json.loads(json.dumps(records))
    return records[1:]


def test_isolated_run_matches_in_process_run(taesd_bundle, tmp_path, monkeypatch):
    plain = _run(taesd_bundle, tmp_path / "plain.jsonl", False, monkeypatch)
    iso = _run(taesd_bundle, tmp_path / "iso.jsonl", True, monkeypatch)
    assert [(r["scenario"], r["system"], bool(r.get("reused"))) for r in iso] == [
        (r["scenario"], r["system"], bool(r.get("reused"))) for r in plain] == [
        ("full", "latentrt", False), ("full", "diffusers", False), ("taesd", "latentrt", False),
        ("taesd", "diffusers", True)]  # the isolated baseline is reused across scenarios too
    for p, r in zip(plain, iso):
        assert set(r) == set(p) | {"process"} and "process" not in p
        assert set(r["memory"]) - set(p["memory"]) <= {"own_process", "isolated_probe", "primed"}
        assert r["memory"]["own_process"] is True and "isolated" not in r["memory"]  # no memory probe
        assert {k: v["calls"] for k, v in r["stages"].items()} == {k: v["calls"] for k, v in p["stages"].items()}
        assert r["e2e"]["n"] == p["e2e"]["n"] == 1 and r["memory"]["weight_bytes"] == p["memory"]["weight_bytes"]
        assert r["process"]["isolated"] is True and r["process"]["parent_pid"] == os.getpid()
        assert r["process"]["pid"] != os.getpid() and r["process"]["wall_s"] > 0
        assert r["settings"]["isolate"] is True and p["settings"]["isolate"] is False
    assert "isolated_probe" in iso[0]["memory"] and "isolated_probe" not in iso[1]["memory"]
    # a fresh process made latentrt's first call of each scenario before the measured one (it fills the caches)
    for r in (iso[0], iso[2]):
        primed = r["memory"]["primed"]
        assert "error" not in primed and primed["first_image_s"] > 0 and primed["peak_rss_bytes"] > 0
    assert all("primed" not in r["memory"] for r in plain + [iso[1], iso[3]])
    pids = [r["process"]["pid"] for r in iso]
    assert len(set(pids[:3])) == 3 and pids[3] == pids[1]  # one child per measured system; reuse spawns none
    # PSNR against the fp32 diffusers image: the same as in one process
    assert iso[0]["quality"]["psnr_db"] == pytest.approx(plain[0]["quality"]["psnr_db"], rel=1e-9)
    assert iso[0]["quality"]["psnr_db"] > 60 and "quality" not in iso[2]


def test_failing_child_names_scenario_system_and_stderr(taesd_bundle, tmp_path):
    from latentrt.bench.child import ChildError
    from latentrt.bench.harness import run_benchmarks

    out = tmp_path / "out.jsonl"
    sc = Scenario(name="broken", model=str(taesd_bundle), height=64, width=64, steps=1, warmup=0, repeats=1,
                  backend="no-such-backend", isolate=True, cold_start=False)
    with pytest.raises(ChildError, match=r"(?s)scenario 'broken': latentrt failed in its own process.*"
                                         r"exited with status 1.*unknown backend 'no-such-backend'"):
        run_benchmarks([sc], out_path=out, progress=False, gemm=False)
    lines = [json.loads(x) for x in out.read_text().splitlines()]  # only complete lines, no result
    assert [x["type"] for x in lines] == ["env"]


def test_failing_baseline_child(tmp_path):
    from latentrt.bench.child import ChildError, run_in_child
    from latentrt.bench.harness import Progress, Runner

    missing = tmp_path / "no-such-bundle"
    sc = Scenario(name="gone", model=str(missing), height=64, width=64, steps=1, warmup=0, repeats=1, isolate=True)
    with pytest.raises(ChildError, match=r"(?s)scenario 'gone': diffusers failed in its own process.*no-such-bundle"):
        run_in_child(Runner(out_path=None, progress=False), sc, missing, Progress(0, False), "diffusers")


def test_killed_child(tmp_path, monkeypatch):
    """A child killed by the kernel (SIGKILL: what the OOM killer sends) is reported as such, at once."""
    import sys

    from latentrt.bench.child import ChildError, run_in_child
    from latentrt.bench.harness import Progress, Runner

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'about to be killed' >&2\nkill -9 $$\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    sc = Scenario(name="oom", model="x", height=64, width=64, steps=1, warmup=0, repeats=1, isolate=True)
    with pytest.raises(ChildError, match=r"(?s)scenario 'oom': latentrt failed .*killed by signal 9 - out of memory\?"
                                         r".*about to be killed"):
        run_in_child(Runner(out_path=None, progress=False), sc, tmp_path, Progress(0, False), "latentrt")
