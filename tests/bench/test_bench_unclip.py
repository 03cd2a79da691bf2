"""`latentrt bench` on tiny Stable unCLIP bundles: text-to-image through the prior (task "unclip") and
image variations (task "unclip-variation"), against StableUnCLIPPipeline / StableUnCLIPImg2ImgPipeline
on the same weights, seeded input image and noise: records, the same stages on both sides, PSNR."""

from __future__ import annotations

import json

import pytest

from latentrt.bench.scenarios import Scenario

STEPS = 2
PRIOR_STEPS = 25  # both pipelines' default
STAGES = {"unclip": {"prior_text_encoder", "prior", "text_encoder", "unet", "vae_decoder"},
          "unclip-variation": {"image_encoder", "text_encoder", "unet", "vae_decoder"}}
CLASSES = {"unclip": "StableUnCLIPPipeline", "unclip-variation": "StableUnCLIPImg2ImgPipeline"}


@pytest.fixture(scope="module")
def records(unclip_bench_bundles, tmp_path_factory):
    from latentrt.bench.harness import run_benchmarks

    out = tmp_path_factory.mktemp("bench") / "unclip.jsonl"
    common = dict(height=64, width=64, steps=STEPS, guidance=10.0, threads=1, warmup=0, repeats=1, cold_start=False,
                  isolated_memory=False)
    # the variation's baseline is measured once, as the full-size scenarios measure a slow baseline
    once = {"unclip": {}, "unclip-variation": dict(repeats=2, baseline_warmup=0, baseline_repeats=1, flops=False)}
    scen = [Scenario(name=task, task=task, model=str(bundle), **{**common, **once[task]})
            for task, bundle in unclip_bench_bundles.items()]
    run_benchmarks(scen, out_path=out, progress=False, gemm=False)
    return [json.loads(x) for x in out.read_text().splitlines()][1:]


@pytest.mark.parametrize("task", sorted(STAGES))
def test_records_stages_and_psnr(records, task):
    ours, base = [r for r in records if r["scenario"] == task]
    assert (ours["system"], base["system"]) == ("latentrt", "diffusers")
    assert base["baseline"]["pipeline"] == CLASSES[task]
    assert set(ours["stages"]) == set(base["stages"]) == STAGES[task]
    assert ours["stages"]["unet"]["calls"] == base["stages"]["unet"]["calls"] == STEPS
    if task == "unclip":
        assert ours["stages"]["prior"]["calls"] == base["stages"]["prior"]["calls"] == PRIOR_STEPS
        assert base["flops"]["prior"] > 0
        assert ours["e2e"]["n"] == base["e2e"]["n"] == 1
    else:  # one timed baseline call, no FLOP-counting one, while latentrt repeats
        assert base["e2e"]["n"] == 1 and base["flops"] == {} and ours["e2e"]["n"] == 2
        assert base["cold_start"]["first_image_s"] == base["e2e_samples"][0]
    # same weights, same (seeded) input image and noise, fp32
    assert ours["quality"]["psnr_db"] > 60


def test_report_has_the_unclip_stages(records, tmp_path):
    from latentrt.bench.report import write_report

    path = tmp_path / "unclip.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"type": "env", "schema": records[0]["schema"],
                                                             "run_id": records[0]["run_id"], "time": "t"}, *records]))
    text = write_report([path], tmp_path / "rep").read_text()
    for label in ("| unclip | prior step |", "| unclip | prior text encoder |", "| unclip-variation | image encoder |",
                  "| unclip | UNet step |", "| unclip-variation | VAE decode |"):
        assert label in text
