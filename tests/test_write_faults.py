"""Faults during writes: SIGKILL a writer at random points; nothing half-written is ever read as valid,
and the next run succeeds.

Writers: ``latentrt export`` (the bundle folder), ``latentrt build``'s engine writer (plans, the
manifest's engine records), and the runtime's caches (the verify cache, ONNX Runtime's
optimized-model cache, OpenVINO's IR cache). The TensorRT build itself cannot run here: the build
test runs the real writer path of :func:`latentrt.export.tensorrt_build.build_engines` (graph
clean-up, plan files, manifest updates) with a stand-in builder that returns placeholder plan bytes
(several MiB, so that writing them takes time); no engine is run from them.

Each test is a loop of ``$LATENTRT_FAULT_RUNS`` kills (default 3, to keep CI short; the report
records 20 in a row for each): a child process starts the writer, is killed after a random delay
between 0 and the writer's measured duration, and the state it left is checked.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import latentrt
from latentrt.manifest import read_manifest, verify_files

RUNS = int(os.environ.get("LATENTRT_FAULT_RUNS", "3"))
SEED = int(os.environ.get("LATENTRT_FAULT_SEED", "16"))
KW = dict(num_inference_steps=1, output_type="np", height=64, width=64, generator=0)


def _run_and_kill(cmds, env, delays) -> list[int]:
    """Start the commands together, SIGKILL each one still running after its delay (s); their return codes."""
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in cmds]
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs):
        for p, delay in zip(procs, delays):
            if p.poll() is None and time.monotonic() - t0 >= delay:
                p.send_signal(signal.SIGKILL)
        time.sleep(0.005)
    codes = [p.wait(timeout=60) for p in procs]
    for p, code in zip(procs, codes):
        err = p.stderr.read().decode()
        p.stderr.close()
        assert code in (0, -signal.SIGKILL), f"a writer failed on its own (rc {code}): {err[-2000:]}"
    return codes


def _timed(cmd, env) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    return time.monotonic() - t0


def _fault_loop(cmds, env, duration: float, check, rng) -> dict:
    """RUNS runs, each writer killed at its own random point (up to a little past the time it needs,
    longer when several share the CPUs, so that some finish while others are killed); ``check()`` after
    each run. Returns counts."""
    span = 1.1 * duration * (1 + 0.6 * (len(cmds) - 1))
    killed = 0
    for _ in range(RUNS):
        codes = _run_and_kill(cmds, env, [rng.uniform(0.0, span) for _ in cmds])
        killed += sum(c == -signal.SIGKILL for c in codes)
        check()
    return {"runs": RUNS, "killed": killed, "finished": RUNS * len(cmds) - killed}


def _env(**extra):
    env = {**os.environ, **{k: str(v) for k, v in extra.items()}}
    env.pop("LATENTRT_MEMORY_LIMIT", None)
    return env


@pytest.fixture(scope="module")
def reference(lcm_bundle):
    return latentrt.load(lcm_bundle, optimized_cache=False)("a cat", **KW).images


# -- export ------------------------------------------------------------------------------------------
def test_killed_export_never_leaves_a_bundle_that_loads_half(tiny_lcm_dir, tmp_path, reference):
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "latentrt.cli", "export", str(tiny_lcm_dir), "-o", str(out), "--overwrite",
           "--check", "off"]
    env = _env(LATENTRT_CACHE=tmp_path / "cache")
    duration = _timed(cmd, env)
    rng = random.Random(SEED)

    def check():
        if out.exists():  # a bundle at OUT is a whole one: every file verifies, it loads and runs
            m = read_manifest(out)
            verify_files(out, m)
            np.testing.assert_allclose(latentrt.load(out)("a cat", **KW).images, reference, atol=1e-5)

    stats = _fault_loop([cmd], env, duration, check, rng)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)  # the next run succeeds
    check()
    assert out.exists() and stats["killed"] >= 1, stats
    print(f"export: {stats}, one run {duration:.1f}s")


# -- build (TensorRT engine writer, with a stand-in builder) -------------------------------------------
_BUILD = textwrap.dedent("""
    import hashlib, sys, time
    from latentrt.export.tensorrt_build import build_engines
    from latentrt.profiles import parse_profile

    class StandIn:  # the builder's interface; returns placeholder plans (never run), 6 MiB each
        version, cc = "10.8.0.43", "9.0"
        def compute_capability(self):
            return self.cc
        def build(self, onnx_path, shapes, options, timing_cache, progress):
            time.sleep(0.05)
            block = hashlib.sha256(onnx_path.read_bytes()).digest()
            return block * (6 * 2 ** 20 // len(block))

    profile = parse_profile({"name": "tiny-dyn", "pipeline": "lcm",
                             "dims": {"B": [1, 1, 2], "H": [32, 64, 128], "W": [32, 64, 128]},
                             "precision": {"default": "fp32"}, "builder": {"workspace_gib": 1, "optimization_level": 2}})
    build_engines(sys.argv[1], profile, api=StandIn(), force=True, cleanup="onnxruntime", progress=lambda *_: None)
""")


def test_killed_build_never_records_a_half_written_engine(lcm_bundle, tmp_path):
    from latentrt.engine_cache import engine_problems, engine_records, onnx_sha, select_engine

    bundle = tmp_path / "bundle"
    shutil.copytree(lcm_bundle, bundle, ignore=shutil.ignore_patterns(".cache"))
    script = tmp_path / "build.py"
    script.write_text(_BUILD)
    cmd = [sys.executable, str(script), str(bundle)]
    env = _env()
    duration = _timed(cmd, env)
    rng = random.Random(SEED)
    names = set(read_manifest(bundle).components)

    def check():
        m = read_manifest(bundle)  # the manifest is never half-written
        verify_files(bundle, m)
        for key, rec in engine_records(m).items():  # every recorded engine is whole
            assert engine_problems(rec, onnx_sha=onnx_sha(m, rec["component"]), trt_version="10.8.0.43",
                                   compute_capability="9.0", bundle=bundle) == [], (key, rec)
            assert (bundle / rec["path"]).stat().st_size == 6 * 2 ** 20 // 32 * 32

    stats = _fault_loop([cmd], env, duration, check, rng)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)  # the next run succeeds
    check()
    m = read_manifest(bundle)
    for c in names:
        select_engine(m, c, bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")
    assert stats["killed"] >= 1, stats
    print(f"build: {stats}, one run {duration:.1f}s")


# -- runtime caches ------------------------------------------------------------------------------------
_LOAD = "import sys, latentrt; latentrt.load(sys.argv[1], backend=sys.argv[2], **({'precision': 'fp32'} " \
        "if sys.argv[2] == 'openvino' else {}))"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_killed_cache_writers_never_leave_an_entry_read_as_valid(lcm_bundle, tmp_path, reference, backend):
    """Two loaders start together on an empty cache (verify cache + optimized-model or IR cache) and
    are killed at random points; then a load reads whatever they left and must give the reference
    image. The cache is emptied before each run so that every run writes it."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    cache = tmp_path / "cache"
    env = _env(LATENTRT_CACHE=cache)
    cmd = [sys.executable, "-c", _LOAD, str(lcm_bundle), backend]
    duration = _timed(cmd, env)
    rng = random.Random(SEED)
    opts = {"precision": "fp32"} if backend == "openvino" else {}
    hits = []

    def check():
        hits.append(len([p for p in (*cache.rglob("*.ort.onnx"), *cache.rglob("*.xml")) if not p.name.startswith(".")]))
        os.environ["LATENTRT_CACHE"] = str(cache)
        try:
            pipe = latentrt.load(lcm_bundle, backend=backend, **opts)
            np.testing.assert_allclose(pipe("a cat", **KW).images, reference, atol=1e-4)
        finally:
            del os.environ["LATENTRT_CACHE"]
        shutil.rmtree(cache, ignore_errors=True)

    stats = _fault_loop([cmd, cmd], env, duration, check, rng)
    print(f"{backend} cache: {stats}, complete-looking entries left per run {hits}, one load {duration:.1f}s")
    assert stats["killed"] >= 1


def test_ort_cache_writers_never_rewrite_a_complete_entrys_weights(lcm_bundle, tmp_path, monkeypatch, reference):
    """Each writer of the optimized-model cache writes its own weights file and renames its graph into
    place last, so a complete entry (graph + the weights it names) is never changed by a later writer,
    killed or not (before, every writer rewrote one shared ``.data`` file in place)."""
    from latentrt.onnx_refs import external_data_locations

    monkeypatch.setenv("LATENTRT_CACHE", str(tmp_path))
    first = latentrt.load(lcm_bundle)
    graph = next(tmp_path.rglob("unet-*.ort.onnx"))
    (data,) = external_data_locations(graph)
    before = (graph.parent / data).read_bytes()
    graph.unlink()  # the next load is a second writer of the same entry
    second = latentrt.load(lcm_bundle)
    assert not first.engines["unet"].cache_hit and not second.engines["unet"].cache_hit
    (data2,) = external_data_locations(graph)
    assert data2 != data and (graph.parent / data).read_bytes() == before
    assert not list(tmp_path.rglob(".*.tmp"))
    third = latentrt.load(lcm_bundle)
    assert third.engines["unet"].cache_hit
    np.testing.assert_allclose(third("a cat", **KW).images, reference, atol=1e-5)
