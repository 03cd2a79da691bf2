"""Interleaved A/B timing of engine calls in one process (the UNet-step A/B scripts in benchmarks/):
every round runs each variant once, the order rotating from round to round, so that drift of a shared
machine's load falls evenly on the variants."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable


def unet_step_engine(backend: str, path: Path, spec, threads: int, scratch: Path | None, precision: str = "bf16"):
    """A UNet graph's engine as the A/B scripts compare it: ONNX Runtime fp32 (no optimized-model cache),
    or OpenVINO at ``precision`` with its model cache under ``scratch``."""
    if backend == "onnxruntime":
        from ..runtime.engines.onnxruntime import OrtEngine

        return OrtEngine("unet", path, spec.inputs, spec.outputs, threads=threads, optimized_cache=False)
    from ..runtime.engines.openvino import OpenVINOEngine

    if scratch is None:
        raise ValueError("the OpenVINO engine needs a scratch folder for its model cache")
    return OpenVINOEngine("unet", path, spec.inputs, spec.outputs, threads=threads, precision=precision,
                          cache_dir=scratch / path.parent.parent.name)


def unet_step_engines(backend: str, graphs: dict, threads: int, scratch: Path | None = None,
                      progress: Callable[[str], None] = print) -> dict:
    """:func:`unet_step_engine` for every ``{name: (path, spec)}`` of ``graphs``, reporting each load time."""
    engines = {}
    for name, (path, spec) in graphs.items():
        t0 = time.perf_counter()
        engines[name] = unet_step_engine(backend, path, spec, threads, scratch)
        progress(f"{backend}: loaded {name} in {time.perf_counter() - t0:.1f}s")
    return engines


def interleaved(calls: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 0,
                progress: Callable[[str], None] = print, label: str = "") -> dict:
    """``warmup`` untimed rounds, then ``rounds`` timed ones (round r starts at variant r mod n).
    Returns ``times_s`` (per variant, in order), ``median_s`` and ``min_s`` (the least disturbed)."""
    names = list(calls)
    if not names or rounds < 1:
        raise ValueError("interleaved() needs at least one variant and one round")
    for _ in range(max(0, warmup)):
        for v in names:
            calls[v]()
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(rounds):
        k = r % len(names)
        for v in names[k:] + names[:k]:
            t0 = time.perf_counter()
            calls[v]()
            times[v].append(time.perf_counter() - t0)
        progress(f"{label}round {r + 1}/{rounds}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in names))
    return {"times_s": times, "median_s": {v: statistics.median(t) for v, t in times.items()},
            "min_s": {v: min(t) for v, t in times.items()}}


def append_jsonl(path: Path | None, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (the A/B scripts' ``--out``); nothing when ``path`` is None."""
    if path is not None:
        import json

        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
