"""``latentrt check``: run every component of a bundle on several backends on the same inputs and
compare what they return (max abs error, relative error, PSNR), output by output.

The first backend is the reference. Inputs are drawn once per component from its spec (token ids
in the vocabulary, timesteps in [0, 999], images in [-1, 1], the rest standard normal) at the
bundle's default size, so every backend sees identical arrays. Polygraphy's comparator does the
same job for ONNX Runtime vs TensorRT only; this one covers every latentrt backend (onnxruntime on
any provider, torch, tensorrt) behind the one engine interface.

Tolerance (relative to the reference's largest magnitude, as at export): 1e-3 for fp32 components
and 5e-2 for fp16 ones, unless given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .spec import concrete_shape

TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # the export-time parity tolerances


@dataclass
class Comparison:
    component: str
    output: str
    backend: str
    max_abs: float
    rel: float
    psnr: float
    tolerance: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.rel <= self.tolerance


def parse_backends(text: str | Sequence[str], default_device: str = "cpu") -> list[tuple[str, str]]:
    """"onnxruntime,torch:cuda" -> [("onnxruntime", "cpu"), ("torch", "cuda")]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        backend, _, device = item.partition(":")
        out.append((backend, device or default_device))
    if len(out) < 2:
        raise ValueError(f"check compares at least two backends (e.g. --backends onnxruntime,torch); got {text!r}")
    return out


def check_inputs(spec, sizes: Mapping[str, int], constants: Mapping, rng: np.random.Generator) -> dict:
    out = {}
    for s in spec.inputs:
        shape = concrete_shape(s, sizes)
        if s.dtype.startswith("int"):
            out[s.name] = rng.integers(0, int(constants.get("vocab_size", 1000)), size=shape).astype(s.dtype)
        elif s.name == "timestep":
            out[s.name] = rng.uniform(0, 999, size=shape).astype(s.dtype)
        elif spec.name == "vae_encoder" or s.name == "image":
            out[s.name] = rng.uniform(-1, 1, size=shape).astype(s.dtype)
        else:
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return out


def compare_arrays(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, bool]:
    """(max abs error, max abs error / max |ref|, PSNR in dB over ref's range, all finite)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, other {got.shape}")
    finite = bool(np.isfinite(got).all())
    diff = np.abs(got - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)
    mse = float(np.mean(diff ** 2)) if diff.size else 0.0
    peak = float(ref.max() - ref.min()) if ref.size else 0.0
    psnr = math.inf if mse == 0 else 10 * math.log10(max(peak, 1e-12) ** 2 / mse)
    return max_abs, max_abs / scale, psnr, finite


def check_bundle(path, backends: Sequence[tuple[str, str]], *, components: Sequence[str] | None = None,
                 sizes: Mapping[str, int] | None = None, tolerance: float | None = None, seed: int = 0,
                 engine_options: Mapping[str, dict] | None = None) -> list[Comparison]:
    from .runtime.bundle import Bundle

    bundle = Bundle(path)
    m = bundle.manifest
    names = list(components) if components else list(m.components)
    size = {"B": 1, "H": int(m.constants.get("default_height", 512)), "W": int(m.constants.get("default_width", 512))}
    size.update(sizes or {})
    rng = np.random.default_rng(seed)
    results = []
    for name in names:
        if name not in m.components:
            raise ValueError(f"{path}: no component {name!r}; it has {', '.join(m.components)}")
        entry = m.components[name]
        inputs = check_inputs(entry.spec, size, m.constants, rng)
        tol = tolerance if tolerance is not None else TOLERANCE.get(entry.precision, 1e-3)
        outs = []
        for backend, device in backends:
            opts = dict((engine_options or {}).get(backend, {}))
            engine = bundle.engine(name, backend, device, **opts)
            result = engine(**{k: v.copy() for k, v in inputs.items()})
            outs.append({k: np.array(v, dtype=np.float32) if not hasattr(v, "cpu") else v.float().cpu().numpy()
                         for k, v in result.items()})
            del engine
        for s in entry.spec.outputs:
            for (backend, device), got in zip(backends[1:], outs[1:]):
                max_abs, rel, psnr, finite = compare_arrays(outs[0][s.name], got[s.name])
                results.append(Comparison(name, s.name, f"{backend}:{device}", max_abs, rel, psnr, tol, finite))
    return results


def format_report(results: Sequence[Comparison], reference: str) -> str:
    lines = [f"reference: {reference}",
             f"{'component':<14} {'output':<22} {'backend':<18} {'max abs':>10} {'relative':>10} {'PSNR dB':>8}  result"]
    for r in results:
        psnr = "inf" if math.isinf(r.psnr) else f"{r.psnr:.1f}"
        verdict = "ok" if r.ok else ("NaN/inf" if not r.finite else f"FAIL (> {r.tolerance:g})")
        lines.append(f"{r.component:<14} {r.output:<22} {r.backend:<18} {r.max_abs:>10.3g} {r.rel:>10.3g} "
                     f"{psnr:>8}  {verdict}")
    return "\n".join(lines)
