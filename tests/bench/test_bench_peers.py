"""The OpenVINO peers of the benchmark (:mod:`latentrt.bench.peers`), on tiny models.

What runs everywhere (project venv only): the text-encoder re-keying that makes the peers' older
transformers read the same weights, the replayed noise against the draws diffusers makes, the venv
manager (creation, stamp, failure, interrupted creation, the interpreter override), and the report's
columns and targets against the best peer.

What needs the peers' own venvs (optimum-intel pins transformers < 5.6, so it cannot share the project
venv; creating both venvs downloads ~2 GB and takes minutes, too slow for CI): the end-to-end run of
both peers through ``latentrt bench`` and the check that the unmodified folder *would* load a
re-initialised text encoder. Set ``LATENTRT_TEST_PEERS=1`` to run them (the venvs are made on first
use under ``~/.cache/latentrt/peer-venvs`` and reused).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from latentrt.bench.scenarios import Scenario

REAL_PEERS = os.environ.get("LATENTRT_TEST_PEERS") == "1"
needs_peers = pytest.mark.skipif(not REAL_PEERS, reason="set LATENTRT_TEST_PEERS=1 to make the peers' venvs and run them")


def _tiny_clip(path: Path, shard: str | None = None) -> Path:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    m = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=77)).eval()
    m.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_legacy_keys_keep_every_tensor(tmp_path, shard):
    import torch
    from safetensors.numpy import load_file
    from transformers import CLIPTextModel

    from latentrt.bench.peers import needs_legacy_keys, write_legacy_keys

    src = _tiny_clip(tmp_path / "te", shard)
    assert needs_legacy_keys(src), "transformers 5.2x saves CLIP without the text_model. prefix"
    dst = tmp_path / "legacy"
    write_legacy_keys(src, dst)
    assert not needs_legacy_keys(dst)
    before = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    after = {k: v for f in sorted(dst.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert sorted(after) == sorted("text_model." + k for k in before)
    assert all(np.array_equal(before[k], after["text_model." + k]) for k in before)
    if shard:
        index = json.loads(next(dst.glob("*.index.json")).read_text())
        assert set(index["weight_map"]) == set(after)
    ids = torch.tensor([[0, 5, 7, 2]])
    with torch.no_grad():
        a = CLIPTextModel.from_pretrained(str(src))(ids).last_hidden_state
        b = CLIPTextModel.from_pretrained(str(dst))(ids).last_hidden_state
    assert torch.equal(a, b)


def test_peer_folder_rekeys_only_text_encoders(tiny_lcm_dir, tmp_path):
    from latentrt.bench.peers import needs_legacy_keys, peer_folder

    view, rewritten = peer_folder(tiny_lcm_dir, tmp_path / "view")
    assert rewritten == ["text_encoder"]
    assert not (view / "text_encoder").is_symlink() and not needs_legacy_keys(view / "text_encoder")
    assert (view / "unet").is_symlink() and (view / "unet").resolve() == (tiny_lcm_dir / "unet").resolve()
    assert (view / "model_index.json").read_text() == (tiny_lcm_dir / "model_index.json").read_text()


def test_replayed_noise_is_what_diffusers_draws(tiny_lcm_dir, monkeypatch):
    """GenAI is served the draws of diffusers' LCM loop, in order: record diffusers' own draws."""
    import torch
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_text2img as pl
    from diffusers.schedulers import scheduling_lcm as sl

    from latentrt.bench.peers import replay_noise

    drawn = []
    for mod in (pl, sl):
        original = mod.randn_tensor

        def recording(*a, _original=original, **k):
            out = _original(*a, **k)
            drawn.append(out.numpy().copy())
            return out

        monkeypatch.setattr(mod, "randn_tensor", recording)
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(tiny_lcm_dir), safety_checker=None)
    sc = Scenario(model="tiny-lcm", height=64, width=64, steps=3, seed=7)
    pipe("a cat", height=64, width=64, num_inference_steps=3, guidance_scale=8.0,
         generator=torch.Generator("cpu").manual_seed(7), output_type="np")
    replay = replay_noise(sc, tiny_lcm_dir)
    assert len(drawn) == len(replay) == 3
    assert all(np.array_equal(a, b) for a, b in zip(drawn, replay))


# -- the venv manager ---------------------------------------------------------------------------------
def test_venv_is_made_once_with_a_stamp(tmp_path, monkeypatch):
    from latentrt.bench import peer_venv

    monkeypatch.setenv(peer_venv.ENV_ROOT, str(tmp_path))
    monkeypatch.delenv(peer_venv.ENV_PYTHON, raising=False)
    python = peer_venv.ensure_python("empty", ())
    root = python.parent.parent
    assert python.is_file() and (root / peer_venv.STAMP).is_file() and root.parent == tmp_path
    mtime = (root / peer_venv.STAMP).stat().st_mtime_ns
    assert peer_venv.ensure_python("empty", ()) == python
    assert (root / peer_venv.STAMP).stat().st_mtime_ns == mtime, "a complete venv was made again"
    assert peer_venv.venv_dir("empty", ("a==1",)) != root  # another pin, another venv
    # an interrupted creation (no stamp) is removed and made again
    (root / peer_venv.STAMP).unlink()
    (root / "leftover").write_text("x")
    assert peer_venv.ensure_python("empty", ()) == python
    assert not (root / "leftover").exists() and (root / peer_venv.STAMP).is_file()


def test_failed_install_names_pip_and_leaves_nothing(tmp_path, monkeypatch):
    from latentrt.bench import peer_venv

    monkeypatch.setenv(peer_venv.ENV_ROOT, str(tmp_path))
    monkeypatch.delenv(peer_venv.ENV_PYTHON, raising=False)
    missing = str(tmp_path / "no-such-package-1.0-py3-none-any.whl")  # a local path: pip fails without a registry
    with pytest.raises(peer_venv.PeerEnvError, match=r"(?s)pip install of the broken peer's requirements failed.*log"):
        peer_venv.ensure_python("broken", (missing,))
    assert not peer_venv.venv_dir("broken", (missing,)).exists()


def test_python_override(tmp_path, monkeypatch):
    from latentrt.bench import peer_venv

    monkeypatch.setenv(peer_venv.ENV_PYTHON, sys.executable)
    assert peer_venv.ensure_python("optimum-intel", ("x==1",)) == Path(sys.executable)
    monkeypatch.setenv(peer_venv.ENV_PYTHON, str(tmp_path / "nope"))
    with pytest.raises(peer_venv.PeerEnvError, match="is not an interpreter"):
        peer_venv.ensure_python("optimum-intel", ())


# -- the report against the peers --------------------------------------------------------------------
def _rec(system, e2e, *, scenario="s", vae="full", rss=4 << 30, psnr=None, same=True, new_load=None, new_first=1.0):
    rec = {"type": "result", "schema": "latentrt-bench/1", "run_id": "r", "scenario": scenario, "system": system,
           "vae": vae, "group": f"m|512x512|4|1|{vae if system == 'latentrt' else 'full'}", "precision": "fp32",
           "backend": "openvino", "settings": {"targets": True}, "e2e": {"median": e2e, "p90": e2e, "p99": e2e},
           "stages": {}, "overhead": {"median": 0.0, "fraction_median": 0.0}, "memory": {"peak_rss_bytes": rss},
           "cold_start": {}}
    if psnr is not None:
        rec["quality"] = {"psnr_db": psnr, "reference": "diffusers fp32", **({} if system == "latentrt" else {"same_weights": same})}
    if new_load is not None:
        rec["cold_start"] = {"new_process": {"load_s": new_load, "first_image_s": new_first}} if system == "latentrt" \
            else {"load_second_s": new_load, "first_image_second_s": new_first}
    return rec


def test_report_against_the_best_peer():
    from latentrt.bench.report import best_peer, results_table, target_checks

    ours = _rec("latentrt", 4.0, psnr=50.0, new_load=1.5, rss=3 << 30)
    results = [ours, _rec("diffusers", 30.0), _rec("optimum-intel", 6.0, psnr=49.0, new_load=7.0, rss=7 << 30),
               _rec("openvino-genai", 5.0, psnr=12.0, same=False, new_load=3.0, rss=6 << 30)]
    # GenAI is faster but did not run the same weights: optimum-intel is the best peer
    assert best_peer(results, ours)["system"] == "optimum-intel"
    checks = {c.name: c for c in target_checks([], results)}
    assert checks["e2e_speedup_vs_best_peer"].value == pytest.approx(1.5) and checks["e2e_speedup_vs_best_peer"].met
    assert checks["new_process_load_s"].value == 1.5 and checks["new_process_load_s"].met
    assert checks["new_process_load_vs_best_peer"].value == pytest.approx(0.5)  # vs GenAI's 3.0 s
    assert checks["peak_rss_vs_best_peer"].value == pytest.approx(0.5)
    assert checks["new_process_first_use_s"].value == pytest.approx(1.5 + 1.0 - 4.0)
    psnrs = [c for c in target_checks([], results) if c.name == "peer_same_weights_psnr_db"]
    assert [c.met for c in psnrs] == [True, False]
    table = results_table(results)
    assert "1.50x (optimum-intel)" in table and "**not the same model**" in table


# -- the real peers -------------------------------------------------------------------------------------
@needs_peers
def test_unmodified_folder_would_lose_the_text_encoder(tiny_lcm_dir, tmp_path):
    """The reason for the re-keying: the peers' transformers reads none of the 5.2x text-encoder keys."""
    from latentrt.bench.peers import EXPORTER, _source_link, peer_env, python_of

    import subprocess

    code = ("import json,sys; from transformers import CLIPTextModel; "
            "_, i = CLIPTextModel.from_pretrained(sys.argv[1], output_loading_info=True); "
            "print(json.dumps(len(i['missing_keys'])))")
    r = subprocess.run([str(python_of(EXPORTER)), "-c", code, str(tiny_lcm_dir / "text_encoder")], capture_output=True,
                       text=True, encoding="utf-8", errors="replace", env=peer_env(_source_link(tmp_path)), check=True)
    assert json.loads(r.stdout.strip().splitlines()[-1]) > 0


@needs_peers
def test_peers_through_the_harness(tmp_path):
    from latentrt.bench.harness import run_benchmarks

    sc = Scenario(name="tiny-peers", model="tiny-lcm", height=64, width=64, steps=2, warmup=1, repeats=2, threads=2,
                  backend="openvino", baselines=("diffusers", "optimum-intel", "openvino-genai"), cold_start=True,
                  isolated_memory=False)
    recs = {r["system"]: r for r in run_benchmarks([sc], out_path=tmp_path / "o.jsonl", progress=False, gemm=False)
            if r["type"] == "result"}
    assert set(recs) == {"latentrt", "diffusers", "optimum-intel", "openvino-genai"}
    for name in ("optimum-intel", "openvino-genai"):
        r = recs[name]
        assert r["backend"] == "openvino" and r["memory"]["own_process"] and r["process"]["pid"] != os.getpid()
        assert r["quality"]["same_weights"] and r["quality"]["psnr_db"] >= 30.0
        assert {k: v["calls"] for k, v in r["stages"].items()} == {"text_encoder": 1, "unet": 2, "vae_decoder": 1}
        assert r["cold_start"]["load_second_s"] > 0 and len(r["e2e_samples"]) == 2
        assert r["baseline"]["shapes"] == "static (reshaped to 1x64x64)"
    assert recs["optimum-intel"]["baseline"]["pipeline"] == "OVLatentConsistencyModelPipeline"
    assert recs["latentrt"]["cold_start"]["new_process"]["load_s"] > 0


def test_first_use_of_a_new_process_is_load_plus_first_image_minus_a_warm_image():
    """The cold-start target is about the whole first image, not the load alone: a fast load followed by a
    slow first image misses it, and the peers' new processes are measured the same way beside it."""
    from latentrt.bench.report import target_checks

    ours = _rec("latentrt", 4.0, psnr=50.0, new_load=0.5, new_first=6.0)
    results = [ours, _rec("diffusers", 30.0), _rec("openvino-genai", 4.0, psnr=48.0, new_load=3.0, new_first=4.5)]
    checks = {c.name: c for c in target_checks([], results)}
    assert checks["new_process_load_s"].met  # 0.5 s
    first_use = checks["new_process_first_use_s"]
    assert first_use.value == pytest.approx(2.5) and not first_use.met
    assert "openvino-genai 3500 ms" in first_use.detail
    ours["cold_start"]["new_process"]["first_image_s"] = 5.0
    assert {c.name: c for c in target_checks([], results)}["new_process_first_use_s"].met  # 1.5 s
    # without peers the check is still made
    alone = {c.name: c for c in target_checks([], [ours, _rec("diffusers", 30.0)])}
    assert alone["new_process_first_use_s"].value == pytest.approx(1.5)
