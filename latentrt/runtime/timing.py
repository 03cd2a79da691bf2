"""Per-stage wall-clock timings of a pipeline call (text encoder, each denoising step, VAE)."""

from __future__ import annotations

import time
from contextlib import contextmanager


class StageTimer:
    """Collects durations per stage name; a stage timed several times (UNet steps) keeps each one."""

    def __init__(self, sync=None):
        self.stages: dict[str, list[float]] = {}
        self._sync = sync  # called before reading the clock (device synchronisation on GPU backends)

    @contextmanager
    def __call__(self, stage: str):
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.stages.setdefault(stage, []).append(time.perf_counter() - t0)

    def summary(self) -> dict[str, float]:
        """Total seconds per stage."""
        return {k: sum(v) for k, v in self.stages.items()}

    def as_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.stages.items()}
