"""OpenVINO backend: the CPU fast path (bf16 on CPUs with AVX512-BF16 / AMX, fp32 elsewhere).

Why a second CPU backend: ONNX Runtime's CPU provider runs these graphs in fp32 only (its fp16
kernels are casts around fp32 ones), while OpenVINO's CPU plugin runs convolutions and matmuls in
bf16 on the AMX tiles of recent Xeons, about 5x the fp32 GEMM rate (measured on a 2-core Sapphire
Rapids VM: a full-size SD1.5 UNet step 3-4x and the VAE decoder 4x faster than ONNX Runtime fp32,
image PSNR 50 dB against fp32 on random weights). It reads the bundle's ``model.onnx`` directly
through its ONNX frontend, so bundles need no second export.

Precision (``precision=`` engine option, else ``$LATENTRT_OPENVINO_PRECISION``, else "auto"):

- ``"auto"``: bf16 where it is faster than fp32 on this CPU (AMX; otherwise measured once per machine by
  :mod:`.openvino_auto`: on a Xeon VM without AMX bf16 is slower), else fp32; recorded in
  :attr:`OpenVINOEngine.precision`;
- ``"bf16"``: bf16 compute (refused with a clear message on CPUs that lack it);
- ``"fp32"``: full precision; images match ONNX Runtime within 1e-4;
- ``"fp16"``: fp16 compute where the CPU has AVX512-FP16 (experimental: better accuracy than bf16,
  but slower than fp32 on CPUs without AMX-FP16, e.g. Sapphire Rapids);
- ``"int8"``: the UNet (engine option ``int8_components``: and/or the VAE decoder) quantized by NNCF
  (``int8_method``: "full", int8 convolutions and MatMuls on AMX / VNNI, or "hybrid", int8-weight
  MatMuls), calibrated once through the pipeline and cached (:mod:`.openvino_int8`); the other components run in bf16 where the CPU has it, else fp32
  (:attr:`OpenVINOEngine.compute_precision` says which). Check its images with the benchmark's quality gate.

Start-up: the first load converts the ONNX graph to OpenVINO IR under ``<bundle cache>/openvino``
(keyed by the model's sha256, the OpenVINO version, the weight storage type and the rewrites applied, see
:func:`_ir_cache`), so a second load maps the IR instead of parsing and converting the ONNX file.

Shapes: dynamic by default (one compiled model serves every batch and resolution); ``shapes="static"``
compiles per concrete input shape on first use and keeps it in OpenVINO's model cache (see
:class:`OpenVINOEngine`).

Outputs are copied into fresh numpy arrays owned by the caller (``outputs_are_reused`` is False):
OpenVINO's output tensors belong to the infer request and are overwritten by its next call.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .base import Engine
from .onnxruntime import default_threads
from .openvino_blobs import import_recorded, record
from .openvino_f16 import as_f32_with_f16_weights, is_f16_graph, mark_decompression
from .openvino_groupnorm import VERSION as GROUPNORM_VERSION
from .openvino_groupnorm import rewrite_group_norms
from .openvino_int8 import int8_components as _int8_components
from .openvino_int8 import int8_method as _int8_method
from .openvino_int8 import int8_ir

logger = logging.getLogger("latentrt")

#: our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_HINT_PRECISIONS = {v: k for k, v in PRECISIONS.items()}
#: our device names -> OpenVINO device names
DEVICES = {"cpu": "CPU", "gpu": "GPU", "auto": "AUTO"}
#: OpenVINO capability that each reduced precision needs on the CPU
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
ENV_PRECISION = "LATENTRT_OPENVINO_PRECISION"


def _import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise ImportError(
            f"the openvino backend needs the openvino package ({e}); install it with "
            "`pip install 'latentrt[cpu-fast]'` (or `pip install openvino`)"
        ) from None
    return openvino


def resolve_precision(core, device: str, precision: str | None, threads: int | None = None) -> str:
    """The precision to compile with: one of :data:`PRECISIONS`, checked against the device ("auto":
    bf16 where it is faster than fp32 on this CPU, :mod:`.openvino_auto`)."""
    precision = (precision or os.environ.get(ENV_PRECISION) or "auto").lower()
    if precision not in (*PRECISIONS, "int8", "auto"):
        raise ValueError(
            f"precision must be one of 'auto', {', '.join(map(repr, PRECISIONS))}, 'int8' for the openvino backend; "
            f"got {precision!r}"
        )
    try:
        caps = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # AUTO and some plugins do not report capabilities
        caps = set()
    if precision == "auto":
        from .openvino_auto import auto_precision

        return auto_precision(core, device, caps, int(threads or default_threads()))
    need = _CAPABILITY.get(precision)
    if need and device == "CPU" and need not in caps:
        raise ValueError(
            f"precision {precision!r} needs a CPU with {need} support (OpenVINO reports {sorted(caps)}); "
            "use precision='fp32' (or 'auto')"
        )
    return precision


def _ir_cache(ov, core, name: str, onnx_path: Path, cache_dir: Path, model_sha: str, precision: str,
              groupnorm: bool = False) -> Path:
    """The component converted once to OpenVINO IR (``.xml`` + ``.bin``) under ``cache_dir/openvino``.

    Why IR and not OpenVINO's compiled-model cache (CACHE_DIR): reading IR maps the ``.bin`` into
    memory, while importing a cached blob reads all of it into the heap next to the repacked
    weights (a full-size SD1.5 UNet in bf16 peaked at 8.9 GiB RSS on a blob-cache hit; from fp16-weight
    IR it peaks at 3.6 GiB, first load or second),
    and OpenVINO 2026.4's blob cache key ignores the precision hint (an fp32 blob imported for a
    bf16 request gives NaNs). For reduced precisions the weights are stored as fp16 (half the file
    and the mapping; the CPU plugin repacks them to bf16, which keeps fewer mantissa bits than
    fp16, so nothing is lost that bf16 compute would keep); fp32 keeps fp32 weights. fp16 bundles'
    graphs are first rewritten as fp32 compute over fp16 weights (:mod:`.openvino_f16`: without it the
    CPU plugin converts all weights at compile time and holds ~3x them, 15 GB for the SDXL UNet).
    With ``groupnorm`` (the CPU plugin's IR), GroupNorms are rewritten to keep their tensors channels-last
    (:mod:`.openvino_groupnorm`); the rewrite's version is part of the key.
    """
    compress = precision != "fp32"
    if not model_sha:  # no manifest hash: key by the file's size and mtime
        st = onnx_path.stat()
        model_sha = f"{st.st_size}-{st.st_mtime_ns}"
    # fp16 graphs are rewritten as fp32 compute over fp16 weights unless they run in fp16 (openvino_f16)
    rewrite = precision != "fp16"
    gn = f"|{GROUPNORM_VERSION}" if groupnorm else ""
    key = hashlib.sha256(f"{model_sha}|{ov.__version__}|{int(compress)}|f16rewrite{int(rewrite)}{gn}".encode()).hexdigest()[:16]
    folder = cache_dir / "openvino"
    xml = folder / f"{name}-{'f16w' if compress else 'f32w'}-{key}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    tmp = folder / f".{xml.stem}.{os.getpid()}.{threading.get_ident()}.tmp.xml"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model = core.read_model(str(onnx_path))
        rewritten = rewrite and is_f16_graph(model)
        if rewritten:
            model, _ = as_f32_with_f16_weights(model)
        if groupnorm:
            rewrite_group_norms(model)
        ov.save_model(model, str(tmp), compress_to_fp16=compress)
        del model
        if rewritten:
            mark_decompression(tmp)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))  # the weights first, then the graph
        os.replace(tmp, xml)
    except (OSError, RuntimeError) as e:
        # a read-only or full cache (OpenVINO reports a full disk as "basic_ios::clear: iostream error"):
        # compile from the ONNX file directly, and say why the next load will not be faster
        for t in (tmp, tmp.with_suffix(".bin")):
            t.unlink(missing_ok=True)
        free = _free_gib(folder)
        logger.warning("%s: could not write its OpenVINO IR cache in %s (%s: %s; %s free there): compiling from "
                       "the ONNX file, which every load of this component repeats; free disk space or make the "
                       "bundle's cache writable (or set LATENTRT_CACHE)", name, folder, type(e).__name__,
                       str(e).strip()[:200], f"{free:.1f} GiB" if free is not None else "unknown")
        return onnx_path
    return xml


def _free_gib(folder: Path) -> float | None:
    import shutil

    for p in (folder, *folder.parents):
        try:
            return shutil.disk_usage(p).free / 2**30
        except OSError:
            continue
    return None


#: the compiled models one engine keeps (one per input shape seen, least recently used dropped first)
MAX_SHAPES = 2
SHAPES = ("static", "dynamic")


def inference_hint(core, device: str, precision: str, threads: int | None = None) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for one of our precisions (int8: the compute of the layers
    left in floating point, what "auto" picks)."""
    if precision != "int8":
        return PRECISIONS[precision]
    return "bf16" if resolve_precision(core, device, "auto", threads) == "bf16" else "f32"


def compiled_key(model_sha: str, precision: str, shapes, ov_version: str, threads) -> str:
    """The folder name of one compiled model in OpenVINO's model cache (CACHE_DIR): model, precision
    hint, concrete input shapes (None: dynamic), OpenVINO version and threads. OpenVINO 2026.4's own
    blob key ignores the precision hint (an fp32 blob imported for a bf16 request gave NaNs), so each
    of our keys gets a folder of its own and nothing of another precision or shape can be found there."""
    payload = f"{model_sha}|{precision}|{shapes}|{ov_version}|{threads}"
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class OpenVINOEngine(Engine):
    """One bundle component compiled by OpenVINO. Engine options: ``threads``, ``precision``,
    ``cache`` (False: no IR conversion cache and no compiled-model cache), ``shapes``
    ("dynamic", the default: one model for every shape, compiled at load; "static": compile per
    concrete input shape on first use), ``max_shapes`` (compiled models kept per engine, default
    :data:`MAX_SHAPES`), ``int8_calibration``, ``int8_components`` and ``int8_method`` (:mod:`.openvino_int8`) and ``profile`` (OpenVINO's
    per-op counters summed in :attr:`op_times`; ``python -m latentrt.bench.opprofile``).

    Static shapes: the first call with a new set of input shapes reshapes the IR to them and compiles
    it (issue 18 reports a static UNet step 11-12% faster than the dynamic one at 512x512 on an AMX Xeon; on an
    AMD EPYC without AMX the interleaved A/B of benchmarks/scenarios/sd15_openvino_shapes.toml showed no difference
    before the GroupNorm rewrite below and, with it, UNet steps and VAE decodes 8-10% faster in both pairs; static
    stays opt-in because every new shape compiles on its first call); the compiled models of the last ``max_shapes`` shapes are kept, and each
    is persisted in OpenVINO's model cache under ``<bundle cache>/openvino/compiled/<key>``
    (:func:`compiled_key`), so a new process imports it instead of compiling, straight from the blob
    (:mod:`.openvino_blobs`). A static-shape engine on the CPU compiles an IR whose GroupNorms are
    rewritten to stay channels-last (:mod:`.openvino_groupnorm`: without it the plugin reorders the whole
    tensor before and after every GroupNorm; with dynamic shapes the rewrite measured slower, so dynamic
    engines keep the plain IR; with ``cache=False`` there is no IR and the ONNX graph compiles as it is). Nothing is compiled at load: a component costs nothing until it is first
    called (the VAE encoder of a text-to-image run). (Importing the last-used shapes in background
    threads at load was tried: on 2 cores the imports slowed each other and the first image by as much
    as they overlapped, 10.58 vs 10.49 s median process wall over 3 runs each, so it was left out.)
    """

    def __init__(self, name, path, inputs, outputs, *, device="cpu", threads=None, cache_dir=None, model_sha="",
                 manifest_entry=None, bundle=None, precision=None, cache: bool = True, shapes: str = "dynamic",
                 max_shapes: int = MAX_SHAPES, int8_calibration: dict | None = None, profile: bool = False,
                 int8_components=None, int8_method=None):
        super().__init__(name, inputs, outputs)
        ov = _import_openvino()
        if device not in DEVICES:
            raise ValueError(f"device must be one of {sorted(DEVICES)} for the openvino backend; got {device!r}")
        if shapes not in SHAPES:
            raise ValueError(f"shapes must be one of {SHAPES} for the openvino backend; got {shapes!r}")
        if not isinstance(max_shapes, int) or isinstance(max_shapes, bool) or max_shapes < 1:
            raise ValueError(f"max_shapes must be a positive integer for the openvino backend; got {max_shapes!r}")
        self.device = device
        self.shapes, self.max_shapes = shapes, max_shapes
        self._ov, self._core, self._ov_device = ov, ov.Core(), DEVICES[device]
        self.precision = resolve_precision(self._core, self._ov_device, precision, threads)
        self._config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": inference_hint(self._core, self._ov_device, self.precision, threads),
        }
        if self._ov_device == "CPU":
            self._config["INFERENCE_NUM_THREADS"] = int(threads or default_threads())
        #: with ``profile``: OpenVINO's per-op counters summed over calls, {(op type, kernel): [seconds, count]}
        self.op_times: dict[tuple[str, str], list] | None = {} if profile else None
        if profile:
            self._config["PERF_COUNT"] = True
        model_path = Path(path)
        components = _int8_components(int8_components)  # both checked whatever the precision
        method = _int8_method(int8_method)
        quantized = self.precision == "int8" and name in components
        # GroupNorms channels-last (openvino_groupnorm) where it was measured to pay: the CPU plugin, static shapes
        # (a 512x512 VAE decode 7% faster in bf16; with dynamic shapes 3% slower, so those keep the plain IR)
        groupnorm = self._ov_device == "CPU" and shapes == "static"
        #: what this component computes in: "int8" where it is quantized, else the precision hint's
        #: (a component left unquantized at precision "int8" computes in bf16 or fp32)
        self.compute_precision = "int8" if quantized else _HINT_PRECISIONS[self._config["INFERENCE_PRECISION_HINT"]]
        if quantized:
            if cache_dir is None:
                raise ValueError(f"{name}: precision='int8' keeps its calibrated model in the bundle's cache; "
                                 "load the bundle with latentrt.load (not a bare engine)")
            # int8 convolutions without zero points (openvino_u8conv): the SD1.5 UNet's blob imports in 0.46x the time
            model_path = int8_ir(ov, self._core, name, model_path, Path(cache_dir), model_sha, bundle,
                                 int8_calibration, self._config.get("INFERENCE_NUM_THREADS"), method=method,
                                 groupnorm=groupnorm, unsigned=self._ov_device == "CPU", components=components)
        elif cache and cache_dir is not None:
            model_path = _ir_cache(ov, self._core, name, model_path, Path(cache_dir), model_sha, self.precision,
                                   groupnorm=groupnorm)
        self.cache_path = model_path if model_path != Path(path) else None
        self._model_path = model_path
        self._model_sha = model_sha or str(model_path)
        if self.cache_path is not None:
            # the cached IR's own name (its key: rewrites, calibration) is part of every compiled model's key:
            # the same component quantized or not, calibrated or rewritten otherwise, is another model
            self._model_sha = f"{self._model_sha}|{model_path.name}"
        self._compiled_root = Path(cache_dir) / "openvino" / "compiled" if cache and cache_dir is not None else None
        self._compiled: OrderedDict = OrderedDict()  # shape key -> (compiled model, infer request)
        self._request_lock = threading.Lock()  # one infer request per shape: concurrent pipeline calls take turns
        # outputs by position: the ONNX frontend keeps the graph's output order and names
        self._output_names = [o.name for o in self.outputs]
        #: how each compiled model was obtained, oldest first: {"shapes", "seconds", "cache_dir", "source"
        #: ("compiled", or "imported" straight from its recorded blob)}
        self.compilations: list[dict] = []
        if shapes == "dynamic":
            self._entry(None)

    @property
    def compiled(self):
        """The most recently used compiled model (None before the first call with static shapes)."""
        return next(reversed(self._compiled.values()))[0] if self._compiled else None

    def _fields(self) -> dict:
        """What a recorded blob must match besides its shapes (:mod:`.openvino_blobs`)."""
        return {"model_sha": self._model_sha, "precision": self.precision, "ov": self._ov.__version__,
                "threads": self._config.get("INFERENCE_NUM_THREADS"), "device": self._ov_device}

    def _build(self, key):
        """(compiled model, infer request, record) for one key: imported from its
        recorded blob where there is one, else compiled (through OpenVINO's cache, which writes it)."""
        t0 = time.perf_counter()
        config = dict(self._config)
        cache_dir = None
        # the direct import is what was measured and tested on the CPU plugin; GPU / AUTO keep OpenVINO's lookup
        direct = self._ov_device == "CPU"
        if self._compiled_root is not None:
            cache_dir = self._compiled_root / compiled_key(self._model_sha, self.precision, key, self._ov.__version__,
                                                           config.get("INFERENCE_NUM_THREADS"))
            compiled = (import_recorded(self._ov, self._core, cache_dir, self._ov_device, config, self._fields())
                        if direct else None)
            if compiled is not None:
                return (compiled, compiled.create_infer_request(),
                        {"shapes": key, "seconds": time.perf_counter() - t0, "cache_dir": str(cache_dir),
                         "source": "imported"})
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache_dir)
            except OSError:  # read-only cache: compile without persisting
                cache_dir = None
        try:
            model = self._core.read_model(str(self._model_path))
            if key is not None:
                model.reshape({n: self._ov.PartialShape(list(shape)) for n, shape in key})
            compiled = self._core.compile_model(model, self._ov_device, config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            shape = "" if key is None else " for input shapes " + ", ".join(f"{n}{list(s)}" for n, s in key)
            raise RuntimeError(
                f"{self.name}: OpenVINO could not compile {self._model_path}{shape} ({type(e).__name__}: "
                f"{str(e).strip()[:300]}); re-export the bundle, or use backend='onnxruntime'"
            ) from None
        if cache_dir is not None and direct:
            record(cache_dir, self._fields(), key)
        return (compiled, compiled.create_infer_request(),
                {"shapes": key, "seconds": time.perf_counter() - t0,
                 "cache_dir": str(cache_dir) if cache_dir else None, "source": "compiled"})

    def _entry(self, key):
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            return hit
        compiled, request, how = self._build(key)
        if len(compiled.outputs) != len(self._output_names):
            raise RuntimeError(
                f"{self.name}: the OpenVINO model has {len(compiled.outputs)} outputs but the manifest declares "
                f"{len(self._output_names)} ({', '.join(self._output_names)}); re-export the bundle"
            )
        self._compiled[key] = entry = (compiled, request)
        while len(self._compiled) > (1 if key is None else self.max_shapes):
            self._compiled.popitem(last=False)
        self.compilations.append(how)
        return entry

    def run(self, arrays):
        key = None if self.shapes == "dynamic" else tuple(sorted((n, tuple(np.shape(a))) for n, a in arrays.items()
                                                                 if n in self._dtypes))
        with self._request_lock:
            _, request = self._entry(key)
            request.infer(arrays, share_inputs=True)
            if self.op_times is not None:
                for p in request.get_profiling_info():
                    if p.status == p.Status.EXECUTED:
                        t = self.op_times.setdefault((p.node_type, p.exec_type), [0.0, 0])
                        t[0] += p.real_time.total_seconds()
                        t[1] += 1
            return {n: np.array(request.get_output_tensor(i).data, copy=True) for i, n in enumerate(self._output_names)}
