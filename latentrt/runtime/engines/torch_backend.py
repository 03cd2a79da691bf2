"""torch backend: the component's own torch module, with the I/O of its ONNX graph.

The reference and the verified GPU path. The module comes from the source the bundle was exported
from (``manifest.source``: a local diffusers folder or a hub id; ``source=`` overrides it) and is
wrapped by the same export recipe that traced the ONNX graph, so a component takes and returns
exactly what its spec says on every backend, and the pipelines (and their randomness contract:
every draw in numpy through one noise source) are unchanged.

On CUDA (``device="cuda"``):

- fp16 weights when the bundle's component is fp16 (``dtype=`` overrides); inputs listed in
  ``FP32_INPUTS`` (the timestep) stay float32, as in the fp16 ONNX graph;
- attention through ``torch.nn.functional.scaled_dot_product_attention`` (diffusers'
  ``AttnProcessor2_0`` and transformers' ``sdpa`` are the defaults; :func:`_use_sdpa` makes sure);
- channels-last memory format for the convolutional models (UNet, VAE);
- one CUDA graph per input shape (``cuda_graphs=True``): the first call at a shape warms up on a
  side stream and captures; later calls copy the inputs into the graph's static buffers and replay.
  The UNet forward, the whole model cost of a denoising step, is one graph launch; the scheduler
  step (a few element-wise ops on a (B, 4, H/8, W/8) array) runs in the pipeline.
- optional ``torch.compile`` (``compile=True``), captured in the same CUDA graphs after warm-up.

Inputs are numpy arrays (or torch tensors); outputs are numpy arrays by default, or torch tensors
on the device with ``return_torch=True``. The denoising loop calls the UNet through
``call_on_device`` (``device_loop``, on by default on CUDA), which returns device tensors, so the
latents stay on the GPU between steps and only the per-step noise (drawn on the host, as the
randomness contract requires) is copied to the device. Lifetime: with CUDA graphs and ``return_torch=True`` the
returned tensors are the graph's static outputs, overwritten by the next call at the same shape
(``outputs_are_reused`` is True then); numpy outputs are always fresh copies.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .base import Engine

logger = logging.getLogger("latentrt")

#: loaded diffusers pipelines by (source, revision): the components of one bundle share one load
_PIPELINES: dict[tuple, Any] = {}


def _load_pipeline(source: dict, override: str | None):
    from pathlib import Path

    from ...export.bundle import load_pipeline  # lazy: needs torch + diffusers

    src = override or source.get("path") or source.get("id")
    if not src or (not source.get("id") and not override and not Path(src).is_dir()):
        raise FileNotFoundError(
            f"the torch backend loads each component from the model the bundle was exported from "
            f"(manifest source: {source}), which is not available here; pass source=PATH_OR_HUB_ID "
            "(a diffusers folder or hub id) to the engine options"
        )
    key = (str(src), source.get("revision"))
    if key not in _PIPELINES:
        _PIPELINES[key] = load_pipeline(src, revision=source.get("revision") if not override else None)[0]
    return _PIPELINES[key]


def component_module(bundle, name: str, source: str | None = None):
    """The torch module of component ``name`` with its spec's I/O (the export recipe's wrapper)."""
    from ...export.recipes import detect_kind

    if bundle.manifest.extra.get("loras") and name in ("unet", "text_encoder", "text_encoder_2", "unet_controlnet",
                                                        "unet_adapter"):
        raise ValueError(f"{bundle.path}: the torch backend builds {name} from the source model, which lacks this "
                         "bundle's LoRAs (fused or adapters); run it with backend='onnxruntime', 'openvino' or "
                         "'tensorrt'")
    tiny = bundle.manifest.extra.get("tiny_vae") or {}
    if name.startswith("tiny_vae_") and (tiny.get("path") or tiny.get("id")):
        from ...export.tiny_vae import load_tiny_vae, tiny_vae_plans  # TAESD: its own source

        plans = tiny_vae_plans(load_tiny_vae(tiny.get("path") or tiny["id"])[0], dict(bundle.manifest.constants))[0]
    else:
        pipe = _load_pipeline(bundle.manifest.source, source)
        plans = detect_kind(pipe).components(pipe, dict(bundle.manifest.constants))
        control = bundle.manifest.extra.get("control") or {}
        if control and name not in {p.spec.name for p in plans}:  # ControlNets, adapter, their UNet graphs
            from ...export.control import manifest_control_plans

            plans = plans + manifest_control_plans(pipe, dict(bundle.manifest.constants), plans, control)
        ip = bundle.manifest.extra.get("ip_adapter") or {}
        if ip and name not in {p.spec.name for p in plans}:  # image encoder, projection, IP UNet graphs
            from ...export.ip_adapter import manifest_ip_adapter_plans

            plans = plans + manifest_ip_adapter_plans(pipe, dict(bundle.manifest.constants), plans, ip)
        entry = bundle.manifest.components.get(name)
        if entry is not None and any(s.name == "freeu" for s in entry.spec.inputs):  # latentrt.export.freeu
            from ...export.freeu import with_freeu_input

            plans = [with_freeu_input(p) if p.spec.name == name else p for p in plans]
    for plan in plans:
        if plan.spec.name == name:
            return plan.module
    raise ValueError(f"the source pipeline of {bundle.path} has no component {name!r} "
                     f"(it gives {[p.spec.name for p in plans]})")


def _use_sdpa(module) -> None:
    """diffusers models: AttnProcessor2_0 (SDPA) everywhere, unless a custom processor is set."""
    for sub in module.modules():
        if hasattr(sub, "set_attn_processor") and hasattr(sub, "attn_processors"):
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            procs = sub.attn_processors
            if procs and all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in procs.values()):
                sub.set_attn_processor(AttnProcessor2_0())
            return


class _CudaGraph:
    """One captured forward at one input shape: static inputs -> static outputs."""

    def __init__(self, torch, fn, example: list):
        self.static_in = [t.clone() for t in example]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up (cuDNN autotuning, lazy init, torch.compile) off the capture
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(*self.static_in)

    def __call__(self, args: list):
        for dst, src in zip(self.static_in, args):
            dst.copy_(src)
        self.graph.replay()
        return self.static_out


class TorchEngine(Engine):
    accepts_tensors = True
    def __init__(self, name, path, inputs, outputs, *, device="cpu", bundle=None, manifest_entry=None,
                 dtype: str | None = None, cuda_graphs: bool = True, compile: bool = False,
                 channels_last: bool = True, return_torch: bool = False, source: str | None = None,
                 threads: int | None = None, module=None, device_loop: bool | None = None, **_ignored):
        super().__init__(name, inputs, outputs)
        import torch

        from ...export.precision import FP32_INPUTS

        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU; use device='cpu'")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))
        precision = getattr(manifest_entry, "precision", "fp32")
        if dtype is None:  # fp16 where the bundle is fp16 and the device has fast fp16
            dtype = "float16" if precision == "fp16" and self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        if module is None:
            if bundle is None:
                raise ValueError("TorchEngine needs the bundle (to find the source model) or a module")
            module = component_module(bundle, name, source)
        if self.device.type != "cpu" or self.dtype != torch.float32:
            import copy

            module = copy.deepcopy(module)  # components share submodules (the VAE): never convert in place
        module = module.eval().to(self.device, self.dtype)
        for p in module.parameters():
            p.requires_grad_(False)
        if self.device.type == "cuda":
            _use_sdpa(module)
            self.channels_last = channels_last and any(s.rank == 4 for s in self.inputs)
            if self.channels_last:
                module = module.to(memory_format=torch.channels_last)
        else:
            self.channels_last = False
        self.module = torch.compile(module, dynamic=False) if compile else module
        self.keep_fp32 = set(FP32_INPUTS)
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.return_torch = return_torch
        self.outputs_are_reused = self.use_graphs and return_torch
        # the denoising loop keeps latents on the GPU (call_on_device); device_loop=True forces it on
        # the CPU too (the same code path with CPU tensors, as the tests run it)
        self.device_loop = self.device.type == "cuda" if device_loop is None else bool(device_loop)
        if self.device_loop and self.use_graphs:
            self.outputs_are_reused = True  # call_on_device returns the graph's static outputs
        self._graphs: dict[tuple, _CudaGraph | None] = {}  # None: this shape cannot be captured

    def _to_torch(self, spec, value):
        torch = self.torch
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        if t.is_floating_point():
            t = t.to(torch.float32 if spec.name in self.keep_fp32 else self.dtype)
        t = t.to(self.device, non_blocking=True)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _forward(self, *args):
        out = self.module(*args)
        return (out,) if isinstance(out, self.torch.Tensor) else tuple(out)

    def run(self, arrays):
        return self._run(arrays, self.return_torch)

    def run_on_device(self, arrays):
        return self._run(arrays, True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _run(self, arrays, torch_outputs: bool):
        torch = self.torch
        args = [self._to_torch(s, arrays[s.name]) for s in self.inputs]
        with torch.inference_mode():
            if self.use_graphs:
                key = tuple((tuple(a.shape), a.dtype) for a in args)
                graph = self._graphs.get(key, False)
                if graph is False:  # first call at this shape: capture (or learn that it cannot be)
                    try:
                        graph = _CudaGraph(torch, self._forward, args)
                    except RuntimeError as e:  # host syncs inside the model (data-dependent checks)
                        logger.info("%s: no CUDA graph at %s (%s); running eagerly", self.name, key, e)
                        graph = None
                    self._graphs[key] = graph
                outs = graph(args) if graph is not None else self._forward(*args)
            else:
                outs = self._forward(*args)
        if torch_outputs:
            return {s.name: o for s, o in zip(self.outputs, outs)}
        return {s.name: o.detach().to("cpu", torch.float32 if s.dtype == "float32" else torch.float16).numpy()
                for s, o in zip(self.outputs, outs)}
