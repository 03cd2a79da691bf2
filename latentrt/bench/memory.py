"""Peak memory of a phase of the benchmark: host RSS and GPU memory.

Host: on Linux the kernel's high-water mark (``VmHWM``) is reset by writing 5 to
``/proc/self/clear_refs``, which gives an exact peak per phase in one process; elsewhere a sampling
thread (psutil, every few ms) approximates it. GPU: ``torch.cuda`` peak allocation for torch work,
and device-wide used memory sampled (for engines such as ONNX Runtime's CUDA provider that allocate
outside torch).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss() -> int:
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _torch_cuda():
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.result()``: rss_before, peak_rss, peak_rss_delta and,
    with a GPU, gpu_peak_allocated (torch) and gpu_peak_used (device-wide, sampled)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._stop = threading.Event()
        self._sampled_rss = 0
        self._gpu_used_peak = 0
        self._gpu_used_before = 0

    def __enter__(self):
        self.rss_before = current_rss()
        self.exact = _reset_hwm()
        torch = _torch_cuda()
        if torch is not None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            self._gpu_used_before = self._gpu_used_peak = total - free
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        torch = _torch_cuda()
        while not self._stop.wait(self.interval):
            if not self.exact:
                self._sampled_rss = max(self._sampled_rss, current_rss())
            if torch is not None:
                free, total = torch.cuda.mem_get_info()
                self._gpu_used_peak = max(self._gpu_used_peak, total - free)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        peak = _status_kb("VmHWM") if self.exact else max(self._sampled_rss, current_rss())
        self._result = {"rss_before_bytes": self.rss_before, "peak_rss_bytes": peak,
                        "peak_rss_delta_bytes": max(0, peak - self.rss_before),
                        "peak_rss_method": "VmHWM" if self.exact else "sampled"}
        torch = _torch_cuda()
        if torch is not None:
            torch.cuda.synchronize()
            self._result["gpu_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            self._result["gpu_peak_used_delta_bytes"] = int(self._gpu_used_peak - self._gpu_used_before)
        return False

    def result(self) -> dict:
        return dict(self._result)
