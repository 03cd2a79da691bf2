"""Engine backends behind one narrow interface (:class:`~latentrt.runtime.engines.base.Engine`).

``onnxruntime`` (CPU / CUDA / TensorRT execution providers) is the default. Other backends register
themselves here by name and are imported only when asked for, so the CPU runtime never imports torch.
"""

from __future__ import annotations

import importlib

from .base import Engine

#: backend name -> "module:factory". A factory takes (name, path, inputs, outputs, **options).
BACKENDS = {
    "onnxruntime": "latentrt.runtime.engines.onnxruntime:OrtEngine",
    "torch": "latentrt.runtime.engines.torch_backend:TorchEngine",
    "tensorrt": "latentrt.runtime.engines.tensorrt:TensorRTEngine",
    "openvino": "latentrt.runtime.engines.openvino:OpenVINOEngine",
}


def engine_factory(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    module, attr = BACKENDS[backend].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ImportError(f"backend {backend!r} is not available here: {e}") from None


__all__ = ["BACKENDS", "Engine", "engine_factory"]
