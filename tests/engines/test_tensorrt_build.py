"""The code around TensorRT: engine-cache keys, staleness, profile -> shapes, manifest updates,
graph clean-up. TensorRT itself is replaced by :class:`RecordingTensorRT`, which records the calls
and returns placeholder bytes (never loaded as an engine); real builds are in tests/gpu."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from latentrt.engine_cache import (EngineCacheError, component_profile_view, engine_key, engine_problems,
                                   select_engine)
from latentrt.export.tensorrt_build import build_engines, cleanup_onnx
from latentrt.manifest import BundleError, read_manifest
from latentrt.profiles import load_profile, parse_profile

TINY = {"name": "tiny-dyn", "pipeline": "lcm", "dims": {"B": [1, 1, 2], "H": [32, 64, 128], "W": [32, 64, 128]},
        "precision": {"default": "fp32"}, "builder": {"workspace_gib": 1, "optimization_level": 2}}


class RecordingTensorRT:
    """Stands in for :class:`latentrt.export.tensorrt_build.TensorRTAPI` on machines without TensorRT:
    records each build request; the 'plan' it returns is a placeholder that is never run."""

    def __init__(self, version="10.8.0.43", cc="9.0"):
        self.version, self.cc, self.calls = version, cc, []

    def compute_capability(self):
        return self.cc

    def build(self, onnx_path, shapes, options, timing_cache, progress):
        assert onnx_path.is_file()  # the cleaned graph exists while TensorRT reads it
        self.calls.append({"onnx": onnx_path, "shapes": dict(shapes), "options": options, "timing": timing_cache})
        return f"placeholder plan {onnx_path.name} {sorted(shapes)}".encode()


@pytest.fixture
def bundle(lcm_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(lcm_bundle, dst, ignore=shutil.ignore_patterns(".cache"))
    return dst


@pytest.fixture
def profile():
    return parse_profile(TINY)


def test_engine_key_depends_on_each_input(lcm_bundle, profile):
    spec = read_manifest(lcm_bundle).components["unet"].spec
    view = component_profile_view(profile, spec, "fp32")
    base = engine_key("a" * 64, view, "10.8.0", "9.0")
    assert base == engine_key("a" * 64, view, "10.8.0", "9.0") and len(base) == 20
    other_shapes = component_profile_view(parse_profile({**TINY, "dims": {**TINY["dims"], "B": 1}}), spec, "fp32")
    variants = [engine_key("b" * 64, view, "10.8.0", "9.0"), engine_key("a" * 64, other_shapes, "10.8.0", "9.0"),
                engine_key("a" * 64, view, "11.0.0", "9.0"), engine_key("a" * 64, view, "10.8.0", "8.6"),
                engine_key("a" * 64, component_profile_view(profile, spec, "fp16"), "10.8.0", "9.0")]
    assert len({base, *variants}) == 6
    # a renamed profile with the same shapes gives the component the same engine
    renamed = component_profile_view(parse_profile({**TINY, "name": "other"}), spec, "fp32")
    assert engine_key("a" * 64, renamed, "10.8.0", "9.0") == base
    with pytest.raises(ValueError, match="ONNX sha256"):
        engine_key("", view, "10.8.0", "9.0")


def test_build_writes_engines_and_updates_manifest(bundle, profile):
    trt = RecordingTensorRT()
    log = []
    done = build_engines(bundle, profile, api=trt, progress=log.append)
    m = read_manifest(bundle)
    records = m.extra["engines"]
    assert set(done) == set(m.components) == {r["component"] for r in records.values()}
    assert len(trt.calls) == len(m.components)
    for key, rec in records.items():
        assert rec["path"] == f"engines/{key}/{rec['component']}.plan" and (bundle / rec["path"]).is_file()
        assert rec["tensorrt"] == "10.8.0.43" and rec["compute_capability"] == "9.0" and rec["profile"] == "tiny-dyn"
        assert not engine_problems(rec, onnx_sha=m.components[rec["component"]].files[m.components[rec["component"]].path],
                                   trt_version="10.8.0.43", compute_capability="9.0", bundle=bundle)
    unet = next(c for c in trt.calls if "sample" in c["shapes"] and "timestep" in c["shapes"])
    s = unet["shapes"]["sample"]
    assert (s.min, s.opt, s.max) == ((1, 4, 4, 4), (1, 4, 8, 8), (2, 4, 16, 16))
    assert unet["options"].optimization_level == 2 and unet["options"].workspace_bytes == 1 << 30
    assert {c["timing"] for c in trt.calls} == {bundle / "engines" / "timing-trt10.8.0.43-sm9.0.cache"}
    assert records[next(k for k, r in records.items() if r["component"] == "unet")]["limits"] == \
        {"B": [1, 2], "H": [32, 128], "W": [32, 128]}
    assert any("building engine" in line for line in log)
    assert not list(bundle.glob("*.tmp")) and not list((bundle / "engines").glob(".*"))
    json.loads((bundle / "latentrt.json").read_text())

    # a second build reuses every engine
    trt2 = RecordingTensorRT()
    build_engines(bundle, profile, api=trt2, progress=log.append)
    assert trt2.calls == [] and any("up to date" in line for line in log)


def test_foreign_engines_are_kept_but_never_selected(bundle, profile):
    build_engines(bundle, profile, api=RecordingTensorRT("10.3.0.26", "8.6"), progress=lambda *_: None)
    m = read_manifest(bundle)
    with pytest.raises(EngineCacheError) as e:
        select_engine(m, "unet", bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")
    msg = str(e.value)
    assert "built with TensorRT 10.3.0.26; this machine has TensorRT 10.8.0.43" in msg
    assert "compute capability 8.6; this GPU is 9.0" in msg
    assert "latentrt build" in msg and "--profile tiny-dyn" in msg
    # building on this machine adds engines for it; the other machine's stay selectable there
    trt = RecordingTensorRT()
    build_engines(bundle, profile, api=trt, progress=lambda *_: None)
    assert len(trt.calls) == len(m.components)
    m = read_manifest(bundle)
    k_new, _ = select_engine(m, "unet", bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")
    k_old, _ = select_engine(m, "unet", bundle=bundle, trt_version="10.3.0.26", compute_capability="8.6")
    assert k_new != k_old


def test_stale_engine_is_refused_and_rebuilt(bundle, profile):
    build_engines(bundle, profile, api=RecordingTensorRT(), progress=lambda *_: None)
    m = read_manifest(bundle)
    old_key, old = select_engine(m, "unet", bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")
    # simulate a re-export of the UNet: its ONNX sha changes
    entry = m.components["unet"]
    entry.files[entry.path] = "0" * 64
    m.write(bundle)
    with pytest.raises(EngineCacheError, match="built from another ONNX file.*stale"):
        select_engine(read_manifest(bundle), "unet", bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")
    trt = RecordingTensorRT()
    log = []
    with pytest.raises(BundleError, match="corrupted"):  # the files no longer match: verify refuses first
        build_engines(bundle, profile, api=trt, progress=log.append, components=["unet"])
    # the realistic case: the record of an engine built from an earlier export (other sha, other key)
    entry.files[entry.path] = old["onnx_sha256"]
    stale_key = "f" * 20
    m.extra["engines"][stale_key] = {**m.extra["engines"].pop(old_key), "onnx_sha256": "1" * 64,
                                     "path": f"engines/{stale_key}/unet.plan"}
    (bundle / "engines" / old_key).rename(bundle / "engines" / stale_key)
    m.write(bundle)
    build_engines(bundle, profile, api=trt, progress=log.append, components=["unet"])
    assert len(trt.calls) == 1 and any(f"removing stale engine engines/{stale_key}" in line for line in log)
    records = read_manifest(bundle).extra["engines"]
    assert stale_key not in records and old_key in records and not (bundle / "engines" / stale_key).exists()


def test_corrupted_plan_is_refused(bundle, profile):
    build_engines(bundle, profile, api=RecordingTensorRT(), progress=lambda *_: None, components=["vae_decoder"])
    m = read_manifest(bundle)
    _, rec = select_engine(m, "vae_decoder", bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")
    plan = bundle / rec["path"]
    good = plan.read_bytes()
    os.utime(plan, ns=(rec["plan_mtime_ns"] + 10**9,) * 2)  # a copied bundle: new mtime, same bytes -> hashed, ok
    select_engine(m, "vae_decoder", bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")
    for bad in (b"garbage", bytes(reversed(good))):  # other size; same size, other bytes
        plan.write_bytes(bad)
        with pytest.raises(EngineCacheError, match="does not match its recorded sha256"):
            select_engine(m, "vae_decoder", bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")
    with pytest.raises(EngineCacheError, match="no TensorRT engine of 'unet'.*latentrt build"):
        select_engine(m, "unet", bundle=bundle, trt_version="10.8.0.43", compute_capability="9.0")


def test_precision_mismatch_says_to_reexport(bundle):
    prof = load_profile("sd15-lcm-512")  # fp16 everywhere; the bundle is fp32
    trt = RecordingTensorRT()
    with pytest.raises(BundleError, match="precision mismatch: text_encoder is fp32 but the profile wants fp16.*"
                                          "latentrt export SRC -o BUNDLE --profile sd15-lcm-512"):
        build_engines(bundle, prof, api=trt, progress=lambda *_: None)
    assert trt.calls == []


@pytest.mark.parametrize("method", ["graphsurgeon", "onnxruntime"])
def test_cleanup_keeps_the_graph_numerically_identical(lcm_bundle, tmp_path, method):
    import onnxruntime as ort

    from latentrt.check import check_inputs

    if method == "graphsurgeon":
        pytest.importorskip("onnx_graphsurgeon")  # in the dev extra; build falls back to onnxruntime without it
    m = read_manifest(lcm_bundle)
    spec = m.components["unet"].spec
    out = tmp_path / "clean.onnx"
    assert cleanup_onnx(lcm_bundle / m.components["unet"].path, out, method=method) == method
    feeds = check_inputs(spec, {"B": 2, "H": 64, "W": 96}, m.constants, np.random.default_rng(0))
    ref = ort.InferenceSession(str(lcm_bundle / m.components["unet"].path), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    a, b = ref.run(None, feeds)[0], new.run(None, feeds)[0]
    assert np.abs(a - b).max() <= 1e-5


class RecordingTensorRTModule:
    """A stand-in for the ``tensorrt`` module with the TensorRT 11 Python surface this project uses
    (no BuilderFlag.FP16: it is gone in 11.x). Records what :class:`TensorRTAPI` asks of it; the
    'engine' it returns is placeholder bytes. Checks our calls, not TensorRT."""

    __version__ = "11.0.0.0"

    def __init__(self, input_names):
        import enum
        import types

        self.log = []
        log = self.log
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        self.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
        self.BuilderFlag = enum.Enum("BuilderFlag", "DEBUG")

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Input:
            def __init__(self, name):
                self.name = name

        class Network:
            num_inputs = len(input_names)

            def get_input(self, i):
                return Input(input_names[i])

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                log.append(("parse", path))
                return True

        class Profile:
            def set_shape(self, name, mn, opt, mx):
                log.append(("set_shape", name, tuple(mn), tuple(opt), tuple(mx)))

        class Cache:
            def serialize(self):
                return b"timing"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                log.append(("workspace", pool.name, size))

            def set_flag(self, flag):
                log.append(("set_flag", flag))

            def create_timing_cache(self, blob):
                log.append(("timing_cache_in", bytes(blob)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                log.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return Cache()

            def add_optimization_profile(self, profile):
                log.append(("add_profile",))

            def __setattr__(self, k, v):
                log.append(("config", k, v))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                log.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                log.append(("build",))
                return b"placeholder"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})
        self.module = types.SimpleNamespace(**{k: getattr(self, k) for k in (
            "__version__", "NetworkDefinitionCreationFlag", "MemoryPoolType", "BuilderFlag", "Logger", "Builder",
            "OnnxParser", "IProgressMonitor")})


def test_tensorrt_api_calls_are_strongly_typed(monkeypatch, tmp_path, profile, lcm_bundle):
    import sys

    from latentrt.export.tensorrt_build import TensorRTAPI

    spec = read_manifest(lcm_bundle).components["unet"].spec
    fake = RecordingTensorRTModule([s.name for s in spec.inputs])
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    api = TensorRTAPI()
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"previous")
    shapes = profile.shapes_for(spec)
    assert api.build(tmp_path / "m.onnx", shapes, profile.builder, timing, lambda *_: None) == b"placeholder"
    log = fake.log
    assert ("create_network", 1) in log  # 1 << STRONGLY_TYPED
    assert not any(e[0] == "set_flag" for e in log)  # no precision flags, ever
    assert ("workspace", "WORKSPACE", 1 << 30) in log and ("config", "builder_optimization_level", 2) in log
    assert ("timing_cache_in", b"previous") in log and ("set_timing_cache", False) in log
    assert timing.read_bytes() == b"timing"  # written back for the next build
    assert ("set_shape", "sample", (1, 4, 4, 4), (1, 4, 8, 8), (2, 4, 16, 16)) in log
    assert {e[1] for e in log if e[0] == "set_shape"} == {s.name for s in spec.inputs}
