"""The engine interface every backend implements.

``engine(**inputs) -> dict[name, array]``, with ``engine.inputs`` / ``engine.outputs`` the
component's specs. Inputs are checked against the specs (rank, fixed dims, consistent sizes) and
float inputs are cast to the dtype the model was exported with, so pipelines can keep their own
arithmetic in float32 whatever the precision of the engines.

Lifetime of outputs: a backend documents it in :attr:`Engine.outputs_are_reused`. When it is
True (TensorRT, CUDA graphs) an output buffer is overwritten by the next call of the same engine,
so callers that keep an output across calls must copy it. The pipelines only read an output
before the next call of the same engine, and the scheduler step makes new arrays.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import numpy as np

from ...spec import SpecError, TensorSpec, bind_sizes

#: words in an engine's message that mean it ran out of memory
_MEMORY_WORDS = ("alloc", "out of memory", "memory", "oom", "bad_alloc")


class EngineCallError(RuntimeError):
    """An engine failed on inputs that passed the spec checks; the message names the component, the
    input shapes and what to change, with the engine's own message attached (and chained)."""


@contextlib.contextmanager
def engine_errors(name: str, arrays: Mapping[str, Any]):
    """Re-raise an engine's own exception (ONNX Runtime's Fail / InvalidArgument, OpenVINO's, numpy's
    MemoryError...) as :class:`EngineCallError`; latentrt's own errors pass through."""
    try:
        yield
    except Exception as e:
        if type(e).__module__.startswith("latentrt"):
            raise
        shapes = ", ".join(f"{k} {tuple(getattr(v, 'shape', ()))}" for k, v in arrays.items())
        message = " ".join(str(e).split())[:600] or type(e).__name__
        if isinstance(e, MemoryError) or any(w in message.lower() for w in _MEMORY_WORDS):
            hint = ("it ran out of memory: use a smaller height/width or fewer images per prompt (or set "
                    "LATENTRT_MEMORY_LIMIT so that latentrt refuses such calls before they run)")
        else:
            hint = ("the inputs match the component's spec, so the model itself refused them: check the call's sizes "
                    "against what the bundle was exported for (`latentrt info BUNDLE`), or re-export the bundle")
        raise EngineCallError(f"{name}: the engine failed on inputs {shapes}; {hint}. "
                              f"Engine message ({type(e).__name__}): {message}") from e


class Engine:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: True when an output buffer is reused (overwritten) by the next call of the same engine.
    outputs_are_reused: bool = False
    #: size limits {symbol: (min, max)} this engine accepts, when it has any (TensorRT profiles).
    limits: dict[str, tuple[int, int]] = {}
    #: True when :meth:`call_on_device` returns device tensors (torch), so the denoising loop can keep
    #: its latents on the device between steps (see :mod:`latentrt.runtime.pipelines.device_loop`).
    device_loop: bool = False
    #: True when the engine takes torch tensors as inputs (device backends; ONNX Runtime with I/O binding)
    accepts_tensors: bool = False

    def __init__(self, name: str, inputs, outputs):
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._dtypes = {s.name: np.dtype(s.dtype) for s in self.inputs}

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        arrays = self._checked(inputs)
        with engine_errors(self.name, arrays):
            return self.run(arrays)

    def call_on_device(self, **inputs: Any) -> dict[str, Any]:
        """Like calling the engine, but outputs stay device tensors where :attr:`device_loop` is True
        (their lifetime is :attr:`outputs_are_reused`'s); other engines return what ``__call__`` does."""
        arrays = self._checked(inputs)
        with engine_errors(self.name, arrays):
            return self.run_on_device(arrays)

    def run_on_device(self, arrays: dict[str, Any]) -> dict[str, Any]:
        return self.run(arrays)

    def synchronize(self) -> None:
        """Wait for the device work queued by this engine (device backends override it)."""

    def _checked(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        arrays = {k: self.cast(k, v) for k, v in inputs.items() if k in self._dtypes}
        arrays.update({k: v for k, v in inputs.items() if k not in self._dtypes})
        sizes = bind_sizes(self.inputs, arrays, component=self.name)
        empty = {k: v for k, v in sizes.items() if v < 1}
        if empty:
            raise SpecError(f"{self.name}: the inputs have empty axes ({', '.join(f'{k}={v}' for k, v in empty.items())}); "
                            "every batch and image size must be at least 1")
        self.check_limits(sizes)
        return arrays

    def cast(self, name: str, value: Any):
        """Cast float inputs to the engine's dtype. Engines that take device tensors
        (:attr:`accepts_tensors`) get torch tensors cast on their device, never copied to the host."""
        want = self._dtypes[name]
        if self.accepts_tensors and type(value).__module__.startswith("torch"):
            import torch

            target = getattr(torch, want.name)
            return value.to(target) if value.dtype != target and value.is_floating_point() == (want.kind == "f") else value
        value = np.asarray(value)
        if value.dtype != want and value.dtype.kind == want.kind:
            value = value.astype(want)
        return np.ascontiguousarray(value)

    def check_limits(self, sizes: Mapping[str, int]) -> None:
        for sym, (lo, hi) in self.limits.items():
            if sym in sizes and not lo <= sizes[sym] <= hi:
                raise SpecError(
                    f"{self.name}: {sym}={sizes[sym]} is outside the engine's profile range [{lo}, {hi}]; "
                    "rebuild the engine with a profile that covers it (latentrt build --profile ...)"
                )

    def run(self, arrays: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
