"""Measured GEMM rate of this machine: the denominator of every "floor" (FLOPs / GFLOP/s).

Run as ``python -m latentrt.bench.gemm --threads N`` (JSON on stdout): the harness calls it in a
subprocess so that BLAS thread settings take effect (they are read at import) and so that importing
torch does not count against the benchmarked process's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _best_rate(fn, flops: float, seconds: float = 0.6, min_iters: int = 3) -> float:
    fn()  # warm up (allocations, thread pool start)
    best, n, t_end = float("inf"), 0, time.perf_counter() + seconds
    while n < min_iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return flops / best / 1e9


def probe(threads: int, size: int = 2048, seconds: float = 0.6) -> dict:
    """GFLOP/s of an fp32 (numpy and torch) and bf16 (torch) square matmul of ``size``."""
    import numpy as np

    flops = 2.0 * size**3
    out: dict = {"size": size, "threads": threads}
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    out["numpy_fp32_gflops"] = round(_best_rate(lambda: a @ a, flops, seconds), 1)
    try:
        import torch
    except ImportError:
        return out
    torch.set_num_threads(threads)
    t = torch.from_numpy(a)
    out["torch_fp32_gflops"] = round(_best_rate(lambda: t @ t, flops, seconds), 1)
    try:
        tb = t.bfloat16()
        out["torch_bf16_gflops"] = round(_best_rate(lambda: tb @ tb, flops, seconds), 1)
    except RuntimeError:  # pragma: no cover - no bf16 matmul on this CPU build
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=0.6)
    a = p.parse_args(argv)
    print(json.dumps(probe(a.threads, a.size, a.seconds)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
