"""``latentrt build BUNDLE --profile NAME``: TensorRT engines from a bundle's ONNX files.

Per component of the bundle:

1. **Graph clean-up.** Constant folding and dead-node removal with onnx-graphsurgeon
   (``fold_constants().cleanup().toposort()``, NVIDIA's own tool for preparing ONNX for TensorRT,
   pip-installable); where it is not installed, ONNX Runtime's *basic* offline optimizer, which
   does the same provider-independent rewrites (constant folding, redundant node elimination) and
   none of the fused contrib ops that TensorRT's parser would not know.
2. **Strongly typed network.** Precision lives in the ONNX graph (fp16 graphs are traced from a
   half copy of the torch model, see :mod:`latentrt.export.precision`); the network is created
   with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (required on TensorRT 10.x, accepted and
   ignored on 11.x, where every network is strongly typed). ``BuilderFlag.FP16`` is never set: it
   is gone in TensorRT 11. The profile's precision for a component must therefore be the one the
   bundle was exported with; otherwise the build stops and says to re-export with the profile.
3. **One optimization profile** from the profile file's min/opt/max (derived from the specs).
4. **Timing cache** kept in ``engines/timing-<trt>-sm<cc>.cache`` between builds.
5. **Engine** written atomically to ``engines/<key>/<component>.plan``; the manifest's
   ``extra["engines"]`` updated atomically after each engine (see :mod:`latentrt.engine_cache`).

All TensorRT calls go through :class:`TensorRTAPI`; tests pass a recording stand-in that records
the calls and returns placeholder bytes, to test the code *around* TensorRT (keys, staleness,
shapes, manifest updates) on machines without a GPU. No engine result is ever faked: the tests of
real engines carry ``@pytest.mark.tensorrt``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Protocol

from ..engine_cache import (ENGINES_DIR, component_profile_view, engine_key, engine_problems, engine_records,
                            onnx_sha)
from ..manifest import BundleError, read_manifest, sha256_file, verify_files, write_bytes_atomic
from ..profiles import BuilderOptions, InputShapes, Profile
from ..sizes import SizeRange

TWO_GIB = 2 << 30


class BuildError(RuntimeError):
    """TensorRT could not parse or build a component."""


class TensorRTBuilderAPI(Protocol):
    """The few TensorRT builder calls the build needs (what tests replace)."""

    version: str

    def compute_capability(self) -> str: ...

    def build(self, onnx_path: Path, shapes: Mapping[str, InputShapes], options: BuilderOptions,
              timing_cache: Path | None, progress: Callable[[str], None]) -> bytes: ...


# -- graph clean-up ----------------------------------------------------------------------------------
def _save_onnx(model, path: Path) -> None:
    import onnx

    try:
        big = model.ByteSize() > TWO_GIB - (64 << 20)
    except Exception:  # protobuf cannot even size messages above 2 GB
        big = True
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def cleanup_onnx(src: Path, dst: Path, *, method: str = "auto") -> str:
    """Constant-fold and clean ``src`` into ``dst``; returns the method used ("graphsurgeon" | "onnxruntime")."""
    if method == "auto":
        try:
            import onnx_graphsurgeon  # noqa: F401
            method = "graphsurgeon"
        except ImportError:
            method = "onnxruntime"
    if method == "graphsurgeon":
        import onnx
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(onnx.load(str(src)))
        graph.fold_constants().cleanup().toposort()
        _save_onnx(gs.export_onnx(graph), dst)
    elif method == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        if src.stat().st_size > TWO_GIB or Path(str(src) + "_data").exists():
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + "_data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    else:
        raise ValueError(f"cleanup method must be 'auto', 'graphsurgeon' or 'onnxruntime'; got {method!r}")
    return method


# -- the real TensorRT builder ------------------------------------------------------------------------
def gpu_compute_capability(device: int = 0) -> str:
    """"major.minor" of the CUDA device (via torch when present, else nvidia-smi)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return f"{major}.{minor}"
    except ImportError:
        pass
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, encoding="utf-8", errors="replace", timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    if not out:
        raise BuildError("no CUDA GPU found: TensorRT engines are built on the GPU they will run on")
    return out[device]


class TensorRTAPI:
    """TensorRT 10.x / 11.x Python builder API, imported lazily."""

    def __init__(self, log_level: str = "WARNING"):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BuildError(f"TensorRT is not installed ({e}); install it with `pip install tensorrt` on a "
                             "machine with an NVIDIA GPU") from None
        self.trt = trt
        self.version = trt.__version__
        self.logger = trt.Logger(getattr(trt.Logger, log_level))

    def compute_capability(self) -> str:
        return gpu_compute_capability()

    def network_flags(self) -> int:
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 1 << int(flag) if flag is not None else 0  # 11.x: strongly typed whatever the flags

    def build(self, onnx_path, shapes, options, timing_cache, progress):
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(self.network_flags())
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError(f"TensorRT's ONNX parser refused {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
        config.builder_optimization_level = options.optimization_level
        cache = None
        if timing_cache is not None:
            blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        missing = [n for n in names if n not in shapes]
        if missing:
            raise BuildError(f"{onnx_path}: the profile gives no shapes for input(s) {missing}")
        for name in names:
            s = shapes[name]
            profile.set_shape(name, s.min, s.opt, s.max)
        config.add_optimization_profile(profile)
        monitor = _progress_monitor(trt, progress)
        if monitor is not None:
            config.progress_monitor = monitor
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BuildError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
        if cache is not None:
            write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
        return bytes(plan)


def _progress_monitor(trt, progress):
    """A ``trt.IProgressMonitor`` printing top-level build phases (TensorRT >= 10)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.t0 = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.t0[phase_name] = time.perf_counter()
            if parent_phase is None:
                progress(f"    {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            dt = time.perf_counter() - self.t0.pop(phase_name, time.perf_counter())
            if dt > 5:
                progress(f"    {phase_name} done in {dt:.0f}s")

    return Monitor()


# -- the build --------------------------------------------------------------------------------------
def _update_manifest(bundle: Path, add: Mapping[str, dict] = {}, remove=()) -> None:
    """Re-read the manifest and write it back with the engine records changed, atomically."""
    manifest = read_manifest(bundle)
    records = engine_records(manifest)
    for key in remove:
        records.pop(key, None)
    records.update(add)
    manifest.extra["engines"] = records
    manifest.write(bundle)


def check_precisions(manifest, profile: Profile, components) -> None:
    bad = [(c, manifest.components[c].precision, profile.precision_for(c)) for c in components
           if manifest.components[c].precision != profile.precision_for(c)]
    if bad:
        detail = ", ".join(f"{c} is {have} but the profile wants {want}" for c, have, want in bad)
        raise BundleError(
            f"precision mismatch: {detail}. Strongly typed TensorRT takes precision from the ONNX graph, so "
            f"re-export the bundle with the profile: `latentrt export SRC -o BUNDLE --profile {profile.name}`"
        )


def build_engines(bundle, profile: Profile, *, api: TensorRTBuilderAPI | None = None, components=None,
                  force: bool = False, cleanup: str = "auto", progress: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the engine of every component for ``profile``; returns {component: record}."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    names = list(components) if components else list(manifest.components)
    unknown = [c for c in names if c not in manifest.components]
    if unknown:
        raise BundleError(f"{bundle}: no component(s) {unknown}; it has {', '.join(manifest.components)}")
    if profile.pipeline and profile.pipeline != manifest.pipeline:
        progress(f"warning: profile {profile.name!r} is meant for {profile.pipeline!r} bundles; this one is "
                 f"{manifest.pipeline!r}")
    check_precisions(manifest, profile, names)
    sizes = SizeRange.from_constants(manifest.constants)
    for sym in ("H", "W"):
        r = profile.dims.get(sym)
        refused = sorted({v for v in (r.as_list() if r else ()) if not sizes.valid(v)})
        if refused:
            near = "; ".join(f"{v}: use {' or '.join(map(str, sizes.nearest(v)))}" for v in refused)
            progress(f"warning: profile {profile.name!r} gives {sym}={r}, but this bundle takes {sizes.describe()}, "
                     f"so calls at {', '.join(map(str, refused))} will be refused at run time ({near})")
    shapes = {c: profile.shapes_for(manifest.components[c].spec) for c in names}  # validate all before building
    verify_files(bundle, manifest, names)
    api = api or TensorRTAPI()
    cc = api.compute_capability()
    engines_dir = bundle / ENGINES_DIR
    engines_dir.mkdir(exist_ok=True)
    timing = engines_dir / f"timing-trt{api.version}-sm{cc}.cache" if profile.builder.timing_cache else None
    progress(f"TensorRT {api.version}, GPU compute capability {cc}, profile {profile.name} ({profile.summary()})")
    done = {}
    for c in names:
        entry = manifest.components[c]
        sha = onnx_sha(manifest, c)
        view = component_profile_view(profile, entry.spec, entry.precision)
        key = engine_key(sha, view, api.version, cc)
        records = engine_records(read_manifest(bundle))
        stale = [k for k, r in records.items() if r.get("component") == c and k != key
                 and r.get("onnx_sha256") != sha]
        for k in stale:  # built from an older export of this component: can never be loaded again
            progress(f"{c}: removing stale engine engines/{k} (built from another ONNX file)")
            shutil.rmtree(engines_dir / k, ignore_errors=True)
        if stale:
            _update_manifest(bundle, remove=stale)
        rec = records.get(key)
        if rec and not force and not engine_problems(rec, onnx_sha=sha, trt_version=api.version,
                                                     compute_capability=cc, bundle=bundle):
            progress(f"{c}: engine engines/{key} is up to date")
            done[c] = rec
            continue
        desc = ", ".join(f"{n} {list(s.min)}..{list(s.max)}" if s.min != s.max else f"{n} {list(s.min)}"
                         for n, s in shapes[c].items())
        progress(f"{c}: building engine engines/{key} ({entry.precision}; {desc})")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{c}-clean-", dir=engines_dir) as scratch:
            cleaned = Path(scratch) / "model.onnx"
            how = cleanup_onnx(bundle / entry.path, cleaned, method=cleanup)
            progress(f"  graph cleaned up ({how})")
            plan = api.build(cleaned, shapes[c], profile.builder, timing, progress)
        out = engines_dir / key / f"{c}.plan"
        write_bytes_atomic(out, plan)
        rec = {
            "component": c, "profile": profile.name, "path": out.relative_to(bundle).as_posix(),
            "plan_sha256": sha256_file(out), "plan_size": out.stat().st_size, "plan_mtime_ns": out.stat().st_mtime_ns,
            "onnx_sha256": sha, "tensorrt": api.version,
            "compute_capability": cc, "precision": entry.precision,
            "shapes": {n: s.as_dict() for n, s in shapes[c].items()},
            "limits": {k: list(v) for k, v in profile.limits_for(entry.spec).items()},
            "builder": {"workspace_gib": profile.builder.workspace_gib,
                        "optimization_level": profile.builder.optimization_level},
            "cleanup": how, "build_seconds": round(time.perf_counter() - t0, 2),
        }
        _update_manifest(bundle, add={key: rec})
        progress(f"  wrote {rec['path']} ({out.stat().st_size / 2**20:.1f} MiB) in {rec['build_seconds']:.1f}s")
        done[c] = rec
    return done
