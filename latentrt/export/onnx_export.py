"""Trace one component to ONNX, convert its precision, check it against torch, hash its files."""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..components import ComponentSpec
from ..manifest import ComponentEntry, sha256_file
from ..spec import concrete_shape, dynamic_axes, make_dummy
from .precision import FP32_INPUTS, eager_attention, harmonize_float_types

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which they go to model.onnx_data (protobuf caps at 2 GB)

#: max |onnx - torch| / max(1, max |torch|) allowed at export, per precision.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


class ExportError(RuntimeError):
    """Export failed: a component could not be traced, or its ONNX graph disagrees with torch."""


@dataclass
class ExportOptions:
    precision: str = "fp32"  # "fp32" | "fp16"
    #: False: no ONNX-vs-torch check (the entry's parity says so); for graphs too big to hold twice
    check: bool = True
    opset: int = OPSET
    # input name -> (low, high) of the dummy values (uniform); int inputs use integers in [low, high)
    value_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    progress: Callable[[str], None] = print


def dummy_inputs(spec: ComponentSpec, sizes, rng: np.random.Generator, value_ranges) -> dict[str, np.ndarray]:
    out = {}
    for s in spec.inputs:
        if s.name in value_ranges:
            lo, hi = value_ranges[s.name]
            shape = concrete_shape(s, sizes)
            if s.dtype.startswith("int"):
                out[s.name] = rng.integers(int(lo), int(hi), size=shape).astype(s.dtype)
            else:
                out[s.name] = rng.uniform(lo, hi, size=shape).astype(s.dtype)
        else:
            out[s.name] = make_dummy(s, sizes, rng)
    return out


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype of a module's parameters (float32 for a module without any)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _torch_outputs(module: torch.nn.Module, spec: ComponentSpec, arrays) -> list[np.ndarray]:
    """The torch reference: float inputs are upcast to float32 for an fp32 module and given as they
    are (the fp16 graph's own input types) to a module that is already half precision."""
    half = module_dtype(module) == torch.float16

    def arg(a):
        return torch.from_numpy(a.astype(np.float32) if a.dtype == np.float16 and not half else a)

    with torch.inference_mode():
        out = module(*[arg(arrays[s.name]) for s in spec.inputs])
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o.detach().float().numpy() for o in out]


def _convert_and_save(traced: Path, path: Path, precision: str) -> None:
    """The traced graph, type-harmonised in fp16, saved as ``path`` (with one ``model.onnx_data``
    file when its weights are large).

    The graph is read without its weights first: fp16 type harmonisation runs shape inference, which
    protobuf caps at 2 GB (the SDXL UNet is 5 GB in fp16); the weights are attached afterwards.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(traced), load_external_data=False)
    if precision == "fp16":
        model = harmonize_float_types(model, base_dir=traced.parent)
    load_external_data_for_model(model, str(traced.parent))
    _save(model, path)


def _save(model, path: Path) -> None:
    import onnx

    big = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _can_size(model) else True
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _can_size(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages above 2 GB
        return False


def export_component(
    module: torch.nn.Module,
    spec: ComponentSpec,
    out_dir: Path,
    *,
    export_sizes: Mapping[str, int],
    check_sizes: Sequence[Mapping[str, int]],
    options: ExportOptions,
    bundle_root: Path,
) -> ComponentEntry:
    """Export ``module`` (whose forward matches ``spec``) to ``out_dir/model.onnx`` and check it.

    ``spec`` is the fp32 declaration; in fp16 the graph is traced from a half copy of ``module`` and
    its float I/O (but :data:`FP32_INPUTS`) becomes float16. The result is checked against the fp32
    torch module.

    A module that is already half precision (a low-memory export loads fp16 components as fp16,
    see :func:`latentrt.export.bundle.export_bundle`) is traced as it is, without an fp32 copy, and
    checked against itself in fp16 (the entry's ``parity.reference`` says which).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    rng = np.random.default_rng(0)
    module = module.eval()
    if options.precision == "fp16" and module_dtype(module) == torch.float16:
        traced_module = module
    else:
        module = module.float()
        traced_module = copy.deepcopy(module).half() if options.precision == "fp16" else module
    if options.precision == "fp16":
        spec = spec.with_float_dtype("float16", keep=FP32_INPUTS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="latentrt-trace-", dir=bundle_root) as scratch:
        traced = Path(scratch) / "model.onnx"
        args = dummy_inputs(spec, export_sizes, rng, options.value_ranges)
        try:
            attention = eager_attention(traced_module) if options.precision == "fp16" else contextlib.nullcontext()
            with warnings.catch_warnings(), torch.inference_mode(), attention:
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    traced_module,
                    tuple(torch.from_numpy(args[s.name]) for s in spec.inputs),
                    str(traced),
                    input_names=[s.name for s in spec.inputs],
                    output_names=[s.name for s in spec.outputs],
                    dynamic_axes=dynamic_axes(spec.inputs + spec.outputs),
                    opset_version=options.opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as e:
            raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
        del traced_module
        _convert_and_save(traced, path, options.precision)
    export_s = time.perf_counter() - t0

    if options.check:
        parity = check_against_torch(module, spec, path, check_sizes, rng, options)
    else:
        parity = {"checked": False, "reason": "check turned off at export"}
    parity["export_seconds"] = round(export_s, 3)
    files = {p.relative_to(bundle_root).as_posix(): sha256_file(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    sizes = {rel: (bundle_root / rel).stat().st_size for rel in files}
    return ComponentEntry(
        name=spec.name,
        path=path.relative_to(bundle_root).as_posix(),
        spec=spec,
        precision=options.precision,
        files=files,
        sizes=sizes,
        parity=parity,
    )


def check_against_torch(module, spec: ComponentSpec, path: Path, check_sizes, rng, options: ExportOptions) -> dict:
    """Run the ONNX file on ONNX Runtime CPU and the torch module on the same random inputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    tol = TOLERANCE[options.precision]
    worst = {"max_abs": 0.0, "max_rel": 0.0}
    per_output: dict[str, float] = {}
    for sizes in check_sizes:
        arrays = dummy_inputs(spec, sizes, rng, options.value_ranges)
        ref = _torch_outputs(module, spec, arrays)
        got = sess.run([s.name for s in spec.outputs], arrays)
        for s, r, g in zip(spec.outputs, ref, got):
            g = np.asarray(g, dtype=np.float32)
            if g.shape != r.shape:
                raise ExportError(f"{spec.name}.{s.name}: ONNX output shape {g.shape} != torch {r.shape} at {dict(sizes)}")
            if not np.isfinite(g).all():
                raise ExportError(f"{spec.name}.{s.name}: ONNX output has NaN/inf at {dict(sizes)} ({options.precision})")
            abs_err = float(np.max(np.abs(g - r))) if r.size else 0.0
            rel = abs_err / max(1.0, float(np.max(np.abs(r))) if r.size else 1.0)
            per_output[s.name] = max(per_output.get(s.name, 0.0), abs_err)
            worst["max_abs"] = max(worst["max_abs"], abs_err)
            worst["max_rel"] = max(worst["max_rel"], rel)
    reference = "torch fp16 (module loaded in fp16)" if module_dtype(module) == torch.float16 else "torch fp32"
    result = {"max_abs": worst["max_abs"], "max_rel": worst["max_rel"], "tolerance": tol, "outputs": per_output,
              "sizes": [dict(s) for s in check_sizes], "backend": "onnxruntime-cpu", "reference": reference}
    if worst["max_rel"] > tol:
        raise ExportError(
            f"{spec.name}: ONNX disagrees with torch (max abs {worst['max_abs']:.3g}, relative "
            f"{worst['max_rel']:.3g} > tolerance {tol}) in {options.precision}; per output: {per_output}"
        )
    return result


