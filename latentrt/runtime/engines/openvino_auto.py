"""``precision="auto"`` on OpenVINO's CPU plugin: bf16 only where it is faster than fp32 on this CPU.

A CPU that reports BF16 among OpenVINO's capabilities is not always faster in bf16. With AMX tiles
(Xeons from Sapphire Rapids on, where the hypervisor exposes them) bf16 runs at several times the fp32
rate, and on an AMD EPYC with AVX512-BF16 the torch bf16 GEMM ran at 919 GFLOP/s against 201 in fp32
(benchmarks/RESULTS.md, int8 section); but on an Intel Xeon whose AMX is hidden (a 2-core VM, AVX512-BF16
only) a full-size SD1.5 UNet step took 5.0 s in fp32 and 5.6 s in bf16, and the VAE decoder 10.4 s
against 16.9 s (interleaved, nothing else running), while OpenVINO's own default there is bf16.

So "auto" decides by measuring, once per machine: a convolution and a matrix multiply shaped like the
UNet's (:func:`measure`) are compiled at both precisions and timed, and bf16 is chosen only when it is
clearly faster (:data:`MARGIN`). CPUs with AMX skip the probe (bf16), and CPUs without BF16 need none
(fp32). The verdict is kept in ``$LATENTRT_CACHE`` (else ``~/.cache/latentrt``) /
``openvino-precision.json`` under a key of CPU model, its bf16/AMX flags, OpenVINO version and thread
count (written atomically; an unreadable file is measured again), so a later process reads it in
microseconds. ``precision="bf16"`` / ``"fp32"`` (or ``$LATENTRT_OPENVINO_PRECISION``) bypass all of it.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from pathlib import Path

#: bf16 is chosen when its probe time is below this fraction of fp32's
MARGIN = 0.85
CACHE_NAME = "openvino-precision.json"
_lock = threading.Lock()
_memo: dict[str, str] = {}


def cache_path() -> Path:
    env = os.environ.get("LATENTRT_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "latentrt") / CACHE_NAME


@functools.lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo ("", empty set where it cannot be read); read once per process
    (every engine a pipeline creates asks)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "", frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def probe_key(ov_version: str, threads: int) -> str:
    model, flags = cpu_flags()
    marks = ",".join(sorted(f for f in flags if "bf16" in f or f.startswith("amx")))
    return f"{model}|{marks}|openvino {ov_version}|threads {threads}"


def choose(fp32_s: float, bf16_s: float) -> str:
    return "bf16" if bf16_s < MARGIN * fp32_s else "fp32"


def measure(core, device: str, threads: int, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` seconds of a 3x3 convolution (1x256x32x32 -> 256) followed by a 1024-wide
    matrix multiply, compiled by OpenVINO at f32 and at bf16 with ``threads``."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([1, 256, 32, 32], ov.Type.f32, name="x")
    w = ops.constant(rng.standard_normal((256, 256, 3, 3)).astype(np.float32) * 0.02)
    y = ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1])
    y = ops.reshape(y, ops.constant(np.array([256, 1024], np.int64)), False)
    m = ops.constant(rng.standard_normal((1024, 1024)).astype(np.float32) * 0.02)
    model = ov.Model([ops.matmul(y, m, False, False)], [x], "precision-probe")
    feed = rng.standard_normal((1, 256, 32, 32)).astype(np.float32)
    out = {}
    for name, hint in (("fp32", "f32"), ("bf16", "bf16"), ("fp32", "f32"), ("bf16", "bf16")):  # twice, interleaved
        compiled = core.compile_model(model, device, {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                                                      "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        request.infer({0: feed})
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            request.infer({0: feed})
            best = min(best, time.perf_counter() - t0)
        out[name] = min(out.get(name, float("inf")), best)
    return out


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def auto_precision(core, device: str, caps: set[str], threads: int, *, measure_fn=measure) -> str:
    """What ``precision="auto"`` compiles with on ``device`` (see the module docstring)."""
    if "BF16" not in caps:
        return "fp32"
    if device != "CPU":
        return "bf16"  # other plugins: their own default
    _, flags = cpu_flags()
    if "amx_bf16" in flags:
        return "bf16"
    import openvino as ov

    key = probe_key(ov.__version__, int(threads))
    with _lock:  # parallel engine creation: one probe per process
        if key in _memo:
            return _memo[key]
        path = cache_path()
        entry = _read(path).get(key)
        if isinstance(entry, dict) and entry.get("choice") in ("fp32", "bf16"):
            _memo[key] = entry["choice"]
            return entry["choice"]
        times = measure_fn(core, device, int(threads))
        choice = choose(times["fp32"], times["bf16"])
        _memo[key] = choice
        try:
            from ...manifest import write_json_atomic

            path.parent.mkdir(parents=True, exist_ok=True)
            data = _read(path)
            data[key] = {"choice": choice, "fp32_s": times["fp32"], "bf16_s": times["bf16"], "margin": MARGIN,
                         "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_json_atomic(path, data)
        except OSError:  # a read-only home: measure again in the next process
            pass
        return choice
