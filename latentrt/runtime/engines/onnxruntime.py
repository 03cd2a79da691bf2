"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers.

Session start-up is made fast on the second load by an optimized-model cache: the first session
saves ONNX Runtime's optimized graph under the cache folder, keyed by the model's sha256, the ONNX
Runtime version and the provider; later sessions load that graph with optimizations off.

Outputs are fresh numpy arrays owned by the caller (``outputs_are_reused`` is False).
"""

from __future__ import annotations

import hashlib
import os
import secrets
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
            # Precision lives in the graph (fp16 exports): no weak-typing fp16 flag, so the EP builds a
            # strongly typed network, which is all TensorRT 11 supports (BuilderFlag.FP16 is gone).
            opts = {"trt_fp16_enable": False}
            if cache_dir is not None:
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir / "ort-trt"),
                            trt_timing_cache_enable=True)
            providers.append((p, opts))
        else:
            providers.append(p)
    return providers


class OrtEngine(Engine):
    def __init__(self, name, path, inputs, outputs, *, device="cpu", threads=None, cache_dir=None, model_sha="",
                 manifest_entry=None, bundle=None, optimized_cache: bool = True, io_binding: bool | None = None,
                 return_torch: bool = False, device_id: int = 0, device_loop: bool | None = None):
        super().__init__(name, inputs, outputs)
        # I/O binding (see _run_bound): on by default for the GPU providers; io_binding=True forces it on CPU
        self.io_binding = device != "cpu" if io_binding is None else bool(io_binding)
        self._bind_device = "cpu" if device == "cpu" else "cuda"
        self.return_torch, self.device_id = return_torch, device_id
        # the denoising loop keeps latents on the GPU through I/O binding (call_on_device); on the
        # CPU provider device_loop=True (with io_binding=True) runs the same path with CPU tensors
        self.accepts_tensors = self.io_binding  # torch tensors are bound in place by _run_bound
        self.device_loop = (self.io_binding and device != "cpu") if device_loop is None else bool(device_loop)
        if self.device_loop and not self.io_binding:
            raise ValueError("device_loop needs I/O binding: pass io_binding=True (it is on by default on GPUs)")
        import onnxruntime as ort

        self.device = device
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 4  # fatal only: a failed run raises, and latentrt re-raises it with its message
        providers = _provider_list(device, cache_dir)
        model_path = Path(path)
        cached = None
        if cache_dir is not None and device == "cpu" and optimized_cache:
            key = hashlib.sha256(f"{model_sha}|{ort.__version__}|{device}|{_cpu_fingerprint()}".encode()).hexdigest()[:16]
            cached = Path(cache_dir) / f"{name}-{key}.ort.onnx"
        if cached is not None and cached.is_file():
            from ...manifest import external_data_files

            external_data_files(cache_dir, cached, f"the cached optimized model {cached.name}")  # stays in the cache
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            model_path = cached
            self.cache_hit = True
        else:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.cache_hit = False
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                # each writer its own temporary graph and weights file: the graph is renamed into place
                # once both are whole, and a complete entry's weights are never rewritten by another writer
                tag = f"{os.getpid()}-{secrets.token_hex(4)}"
                tmp = cached.with_name(f".{cached.name}.{tag}.tmp")
                so.optimized_model_filepath = str(tmp)
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", f"{cached.name}.{tag}.data"
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
        if cached is not None and not self.cache_hit and tmp.is_file():
            os.replace(tmp, cached)  # the optimized graph; its weights went to its own .data file
        self._output_names = [o.name for o in self.outputs]

    def run(self, arrays):
        if self.io_binding:
            return self._run_bound(arrays, self.return_torch)
        values = self.session.run(self._output_names, arrays)
        return dict(zip(self._output_names, values))

    # -- GPU execution providers (CUDA / TensorRT EP): I/O binding --------------------------------------
    def run_on_device(self, arrays):
        """Outputs as fresh device tensors (the denoising loop's ``device_loop``)."""
        return self._run_bound(arrays, True)

    def _run_bound(self, arrays, torch_outputs: bool):
        """Run with ONNX Runtime I/O binding. numpy inputs are copied to the GPU once per call; torch
        CUDA tensors (for example the previous step's output with ``return_torch=True``) are bound by
        pointer, so latents stay on the device between denoising steps. Outputs are written into
        device tensors allocated from the specs (``return_torch=True``: those tensors, fresh each call)
        or copied back to numpy. Made for the GPU providers (onnxruntime-gpu; torch for device tensors);
        ``io_binding=True`` runs the same code on the CPU provider."""
        from ...spec import bind_sizes, concrete_shape

        io = self.session.io_binding()
        keep = []
        for s in self.inputs:
            v = arrays[s.name]
            if isinstance(v, np.ndarray):
                io.bind_cpu_input(s.name, v)
            else:
                import torch

                v = v.to(getattr(torch, s.dtype)).contiguous()  # e.g. the loop's float32 latents into an fp16 graph
                keep.append(v)
                io.bind_input(s.name, self._bind_device, self.device_id, np.dtype(s.dtype).type, list(v.shape),
                              v.data_ptr())
        if keep and self._bind_device == "cuda":
            import torch

            torch.cuda.current_stream().synchronize()  # ORT reads them on its own stream
        if torch_outputs:
            import torch

            sizes = bind_sizes(self.inputs, arrays, component=self.name)  # output shapes to allocate
            outs = {}
            for s in self.outputs:
                t = torch.empty(concrete_shape(s, sizes), dtype=getattr(torch, s.dtype),
                                device="cpu" if self._bind_device == "cpu" else f"cuda:{self.device_id}")
                io.bind_output(s.name, self._bind_device, self.device_id, np.dtype(s.dtype).type, list(t.shape),
                               t.data_ptr())
                outs[s.name] = t
            self.session.run_with_iobinding(io)
            return outs
        for s in self.outputs:
            io.bind_output(s.name, self._bind_device, self.device_id)
        self.session.run_with_iobinding(io)
        return dict(zip(self._output_names, io.copy_outputs_to_cpu()))
