"""Native TensorRT backend: engines built by ``latentrt build`` (see :mod:`latentrt.engine_cache`).

- The engine is picked from ``manifest.extra["engines"]`` for this component, this TensorRT version
  and this GPU's compute capability; a stale or foreign one is refused with the reason and the
  ``latentrt build`` command to run, never loaded. ``profile=`` picks among several profiles.
- Deserialized once per plan file (per process), one execution context and one CUDA stream per
  engine object.
- Device buffers are torch CUDA tensors, allocated once per input shape; shapes are set per call
  with ``IExecutionContext.set_input_shape`` and must lie in the profile the engine was built for:
  outside it the call is refused with the allowed range (:meth:`Engine.check_limits`).
- CUDA graphs: a captured graph fixes the input shapes, the tensor addresses and the execution
  context, so each shape gets its own context and buffers (up to ``max_graphs`` shapes; further
  shapes share the first context and run without graphs; each context holds its own activation
  memory, which is what bounds ``max_graphs``). The first call at a shape runs
  ``execute_async_v3`` (which also flushes TensorRT's deferred shape work, as TensorRT requires
  before capture), the second captures the enqueue into a ``torch.cuda.CUDAGraph``, later calls
  replay it. Engines whose enqueue cannot be captured (some plugins, data-dependent shapes) fall
  back to plain enqueues.

Output lifetime (``outputs_are_reused = True``): with ``return_torch=True`` the returned tensors are
the engine's output buffers for that shape and are overwritten by the next call at the same shape;
copy what you keep. The default numpy outputs are fresh host copies. The denoising loop calls the
UNet through ``call_on_device`` (``device_loop``), which returns those buffers, so latents stay on
the GPU between steps (the loop copies a buffer that a scheduler keeps across steps).

torch and tensorrt are imported lazily (the CPU runtime never imports them).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .base import Engine

logger = logging.getLogger("latentrt")

#: deserialized engines by plan sha256: one deserialization per plan per process
_ENGINES: dict[str, Any] = {}


def _torch_dtype(trt, torch, trt_dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if trt_dtype not in table:
        raise TypeError(f"unsupported TensorRT I/O dtype {trt_dtype}")
    return table[trt_dtype]


class TensorRTEngine(Engine):
    outputs_are_reused = True
    device_loop = True
    accepts_tensors = True

    def __init__(self, name, path, inputs, outputs, *, device="cuda", bundle=None, manifest_entry=None,
                 profile: str | None = None, cuda_graphs: bool = True, return_torch: bool = False,
                 max_graphs: int = 4, **_ignored):
        super().__init__(name, inputs, outputs)
        try:
            import tensorrt as trt
            import torch
        except ImportError as e:
            raise ImportError(f"the tensorrt backend needs the tensorrt and torch packages ({e})") from None
        from ...engine_cache import ENGINES_DIR, select_engine
        from ...manifest import bundle_path

        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs a CUDA GPU; none is visible to torch")
        if bundle is None:
            raise ValueError("TensorRTEngine needs the bundle (its manifest lists the engines)")
        self.trt, self.torch = trt, torch
        dev = torch.device(device if str(device).startswith("cuda") else "cuda")
        self.device = dev
        major, minor = torch.cuda.get_device_capability(dev)
        key, rec = select_engine(bundle.manifest, name, bundle=bundle.path, trt_version=trt.__version__,
                                 compute_capability=f"{major}.{minor}", profile=profile)
        self.engine_key, self.record = key, rec
        self.limits = {k: (int(v[0]), int(v[1])) for k, v in rec.get("limits", {}).items()}
        plan_sha = rec["plan_sha256"]
        if plan_sha not in _ENGINES:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(bundle_path(bundle.path, rec["path"], "plan file",
                                                                 within=ENGINES_DIR).read_bytes())
            if engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {rec['path']}; rebuild it with "
                                   f"`latentrt build {bundle.path} --profile {rec.get('profile')} --force`")
            _ENGINES[plan_sha] = (runtime, engine)
        self.engine = _ENGINES[plan_sha][1]
        with torch.cuda.device(dev):
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(dev)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.io_dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        want = {s.name for s in self.inputs}
        if set(self.input_names) != want:
            raise RuntimeError(f"{name}: engine {rec['path']} has inputs {self.input_names}, the manifest says "
                               f"{sorted(want)}; rebuild it")
        self.use_graphs = cuda_graphs
        self.max_graphs = int(max_graphs)
        self.return_torch = return_torch
        self._shapes: dict[tuple, _ShapeState] = {}

    def _bind(self, ctx, shapes: dict[str, tuple], bufs: dict[str, Any] | None) -> dict[str, Any]:
        """Set the input shapes on ``ctx``, allocate this shape's buffers once, bind their addresses."""
        torch = self.torch
        for n in self.input_names:
            if not ctx.set_input_shape(n, shapes[n]):
                raise ValueError(f"{self.name}: TensorRT refused shape {shapes[n]} for {n!r}; the engine accepts "
                                 f"{self.record.get('shapes', {}).get(n)}")
        if bufs is None:
            bufs = {n: torch.empty(shapes[n], dtype=self.io_dtypes[n], device=self.device) for n in self.input_names}
            for n in self.output_names:
                bufs[n] = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=self.io_dtypes[n], device=self.device)
        for n, t in bufs.items():
            ctx.set_tensor_address(n, t.data_ptr())
        return bufs

    def _state(self, key, shapes) -> "_ShapeState":
        """Per input shape: buffers, and with CUDA graphs a dedicated execution context, because a
        captured graph fixes the shapes, the tensor addresses and the context it was captured with."""
        state = self._shapes.get(key)
        if state is None:
            dedicated = self.use_graphs and sum(st.dedicated for st in self._shapes.values()) < self.max_graphs
            with self.torch.cuda.device(self.device):
                ctx = self.engine.create_execution_context() if dedicated else self.context
            state = self._shapes[key] = _ShapeState(ctx, self._bind(ctx, shapes, None), dedicated)
        elif not state.dedicated:  # the shared context may hold another shape: set this one again
            self._bind(state.ctx, shapes, state.bufs)
        return state

    def _enqueue(self, ctx) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def run(self, arrays):
        return self._run(arrays, self.return_torch)

    def run_on_device(self, arrays):
        """Outputs as this shape's device buffers (the denoising loop's ``device_loop``)."""
        return self._run(arrays, True)

    def _run(self, arrays, torch_outputs: bool):
        torch = self.torch
        shapes = {n: tuple(int(x) for x in arrays[n].shape) for n in self.input_names}
        key = tuple(shapes[n] for n in self.input_names)
        state = self._state(key, shapes)
        bufs = state.bufs
        with torch.cuda.stream(self.stream):
            for n in self.input_names:
                v = arrays[n]
                src = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
                bufs[n].copy_(src.to(self.io_dtypes[n]), non_blocking=not isinstance(v, np.ndarray))
            state.calls += 1
            if state.graph is None and state.dedicated and state.calls == 2:
                # the first call (a plain enqueue) flushed TensorRT's deferred shape work: capture now
                state.graph = self._capture(state.ctx)
            if state.graph is not None:
                state.graph.replay()
            else:
                self._enqueue(state.ctx)
        self.stream.synchronize()
        if torch_outputs:
            return {n: bufs[n] for n in self.output_names}
        specs = {s.name: s for s in self.outputs}
        return {n: bufs[n].to("cpu").numpy().astype(specs[n].dtype if n in specs else "float32", copy=False)
                for n in self.output_names}

    def _capture(self, ctx):
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(ctx)
            return graph
        except RuntimeError as e:
            logger.info("%s: CUDA graph capture not possible (%s); using plain enqueues", self.name, e)
            return None


class _ShapeState:
    __slots__ = ("ctx", "bufs", "dedicated", "graph", "calls")

    def __init__(self, ctx, bufs, dedicated: bool):
        self.ctx, self.bufs, self.dedicated = ctx, bufs, dedicated
        self.graph = None
        self.calls = 0
