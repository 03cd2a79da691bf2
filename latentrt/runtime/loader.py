"""``latentrt.load``: open a bundle and build the pipeline its manifest names."""

from __future__ import annotations

import os

from .bundle import Bundle
from .pipelines import pipeline_class


def load(bundle: str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu", *, verify: bool = True,
         **engine_options):
    """Load ``bundle`` for ``backend`` ("onnxruntime", "torch", "tensorrt") on ``device``.

    ``verify`` checks every model file against the manifest's sha256 (remembered between loads).
    ``engine_options`` go to the backend (for onnxruntime: ``threads``, ``optimized_cache``).
    openvino (the CPU fast path) takes ``threads``, ``precision`` ("auto", "bf16", "fp32") and ``cache``.
    """
    b = Bundle(bundle, verify=verify)
    cls = pipeline_class(b.manifest.pipeline)
    return cls(b, backend=backend, device=device, **engine_options)
