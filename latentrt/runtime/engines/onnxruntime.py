"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers.

Session start-up is made fast on the second load by an optimized-model cache: the first session
saves ONNX Runtime's optimized graph under the cache folder, keyed by the model's sha256, the ONNX
Runtime version and the provider; later sessions load that graph with optimizations off.

Outputs are fresh numpy arrays owned by the caller (``outputs_are_reused`` is False).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import Engine

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def default_threads() -> int:
    """Intra-op threads: LATENTRT_THREADS, else the CPUs this process may use."""
    env = os.environ.get("LATENTRT_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def _cpu_fingerprint() -> str:
    """Optimized CPU graphs can hold hardware-specific kernels (NCHWc): key them by the CPU's flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(line.encode()).hexdigest()[:12]
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _provider_list(device: str, cache_dir: Path | None):
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise ValueError(f"device must be one of {sorted(PROVIDERS)} for the onnxruntime backend; got {device!r}")
    wanted = PROVIDERS[device]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise RuntimeError(
            f"device {device!r} needs ONNX Runtime's {wanted[0]}, but this onnxruntime offers {available}; "
            "install onnxruntime-gpu (and CUDA / TensorRT) or use device='cpu'"
        )
    providers: list[Any] = []
    for p in wanted:
        if p == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": True}
            if cache_dir is not None:
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir / "ort-trt"),
                            trt_timing_cache_enable=True)
            providers.append((p, opts))
        else:
            providers.append(p)
    return providers


class OrtEngine(Engine):
    def __init__(self, name, path, inputs, outputs, *, device="cpu", threads=None, cache_dir=None, model_sha="",
                 manifest_entry=None, bundle=None, optimized_cache: bool = True):
        super().__init__(name, inputs, outputs)
        import onnxruntime as ort

        self.device = device
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        providers = _provider_list(device, cache_dir)
        model_path = Path(path)
        cached = None
        if cache_dir is not None and device == "cpu" and optimized_cache:
            key = hashlib.sha256(f"{model_sha}|{ort.__version__}|{device}|{_cpu_fingerprint()}".encode()).hexdigest()[:16]
            cached = Path(cache_dir) / f"{name}-{key}.ort.onnx"
        if cached is not None and cached.is_file():
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            model_path = cached
            self.cache_hit = True
        else:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.cache_hit = False
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                so.optimized_model_filepath = str(cached) + ".tmp"
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", cached.name + ".data"
                )
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
                )
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own exception types; name the file and the fix
            raise RuntimeError(
                f"{name}: ONNX Runtime could not load {model_path} ({type(e).__name__}: {str(e).strip()[:300]}); "
                "the file may be corrupted or from an unsupported exporter: re-export the bundle"
            ) from None
        if cached is not None and not self.cache_hit:
            tmp = Path(str(cached) + ".tmp")
            if tmp.is_file():
                os.replace(tmp, cached)  # the optimized graph; its weights went to cached.name + ".data"
        self._output_names = [o.name for o in self.outputs]

    def run(self, arrays):
        values = self.session.run(self._output_names, arrays)
        return dict(zip(self._output_names, values))
