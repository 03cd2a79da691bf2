"""The quality gate of a reduced precision (int8): latentrt against diffusers fp32 over several prompts
and seeds, not one image.

With a scenario's ``quality_samples = N`` (N >= 8 for the gate of issue 18) latentrt and the diffusers
baseline each make N more images after their timed calls, prompt ``i`` of :data:`PROMPTS` (cycled)
with seed ``scenario seed + 1000 + i``, one image per call, with the same noise (torch.Generator of
that seed on both sides). Per image: PSNR against the diffusers image and the mean absolute pixel error
on the 0-255 scale. The gate passes when the lowest PSNR is at least ``quality_gate_db``; below it the
record and the report say the precision is not recommended. The prompts differ from the int8
calibration prompts (:mod:`latentrt.runtime.engines.openvino_int8`), so the gate is not scored on what
was calibrated on.

The gate's images travel with a system's first image (concatenated after it along the batch axis), so
in-process and isolated (child-process) runs hand them over the same way.
"""

from __future__ import annotations

import numpy as np

from .stats import psnr

PROMPTS = (
    "a snowy village at dusk with warm lights in the windows",
    "a macro photograph of a dragonfly on a leaf",
    "an astronaut portrait, studio lighting, 85mm",
    "a plate of sushi on a slate board, top-down photo",
    "a medieval castle on a hill, oil painting",
    "a golden retriever running on a beach",
    "a steaming cup of coffee next to a laptop, bokeh",
    "an abstract colorful geometric pattern",
)
SEED_OFFSET = 1000


def gate_calls(sc) -> list[tuple[str, int]]:
    """(prompt, seed) of each gate image of scenario ``sc``."""
    return [(PROMPTS[i % len(PROMPTS)], sc.seed + SEED_OFFSET + i) for i in range(sc.quality_samples)]


def with_gate(first, gate: list) -> tuple[np.ndarray, int]:
    """The first image batch with the gate images after it, and how many gate images there are."""
    first = np.asarray(first)
    return (np.concatenate([first, *map(np.asarray, gate)], axis=0) if gate else first), len(gate)


def split_gate(images, count: int):
    """(first image batch, gate images) of what :func:`with_gate` joined."""
    images = np.asarray(images)
    return (images[: len(images) - count], images[len(images) - count:]) if count else (images, images[:0])


def gate_result(ours: np.ndarray, reference: np.ndarray, threshold_db: float) -> dict:
    """Per image PSNR and mean absolute 0-255 error against the reference; passed when the lowest PSNR
    reaches ``threshold_db``."""
    if len(ours) != len(reference):
        raise ValueError(f"quality gate: {len(ours)} images against {len(reference)} references")
    db = [psnr(a[None], b[None]) for a, b in zip(ours, reference)]
    mae = [float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))) * 255.0) for a, b in zip(ours, reference)]
    passed = bool(db) and min(db) >= threshold_db
    return {"samples": len(db), "psnr_db": db, "mean_abs_error_255": mae, "psnr_min_db": min(db) if db else None,
            "psnr_mean_db": float(np.mean(db)) if db else None, "mean_abs_error_255_max": max(mae) if mae else None,
            "threshold_db": threshold_db, "passed": passed,
            "verdict": "recommended" if passed else f"not recommended: lowest PSNR below {threshold_db:g} dB"}
