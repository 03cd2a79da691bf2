"""Latency statistics. Percentiles use linear interpolation between order statistics (numpy's default
``method="linear"``), written out so that the report needs no numpy and the tests can compare."""

from __future__ import annotations

import math
from typing import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples`` by linear interpolation."""
    if not samples:
        raise ValueError("percentile of an empty sample; run at least one repeat")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100]; got {q}")
    xs = sorted(float(x) for x in samples)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict:
    """n, mean, std (population), min, median, p90, p99, max of ``samples`` (seconds)."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("no samples to summarize; run at least one repeat")
    mean = sum(xs) / len(xs)
    return {
        "n": len(xs),
        "mean": mean,
        "std": math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)),
        "min": min(xs),
        "median": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "max": max(xs),
    }


def psnr(a, b, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, peak] (inf when equal)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR of images with different shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)
