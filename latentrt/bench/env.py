"""What the numbers were measured on: CPU model, flags and threads, memory, GPU, library versions,
the bundle's hash, and the machine's measured GEMM rate (see :mod:`latentrt.bench.gemm`)."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

LIBRARIES = ("latentrt", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "diffusers", "transformers",
             "tokenizers", "openvino", "tensorrt")
#: CPU flags that decide which fast paths exist (AVX-512 / VNNI for int8, bf16 and AMX for bf16)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> dict:
    info: dict = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        info["usable_cpus"] = os.cpu_count()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {**info, "model": platform.processor() or "unknown"}
    fields = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() not in fields:
            fields[k.strip()] = v.strip()
    flags = set(fields.get("flags", "").split())
    info["model"] = fields.get("model name", platform.processor() or "unknown")
    info["flags"] = [f for f in CPU_FLAGS if f in flags]
    return info


def memory_info() -> dict:
    try:
        import psutil

        return {"total_bytes": psutil.virtual_memory().total, "available_bytes": psutil.virtual_memory().available}
    except ImportError:  # pragma: no cover
        return {}


def gpu_info() -> dict | None:
    """The CUDA GPU, when torch is already imported and sees one (never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda, "count": torch.cuda.device_count()}


def installed_versions(names) -> dict:
    """{distribution: version} of those of ``names`` that are installed (stdlib only: the peers' venvs use it)."""
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def library_versions() -> dict:
    out = installed_versions(LIBRARIES)
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = ",".join(ort.get_available_providers())
    except ImportError:  # pragma: no cover
        pass
    return out


def bundle_hash(bundle) -> str:
    """A short hash of every component file's sha256 (from the manifest): two runs on the same
    weights and graphs have the same bundle hash."""
    m = json.loads((Path(bundle) / "latentrt.json").read_text())
    files = sorted((rel, sha) for c in m["components"].values() for rel, sha in c.get("files", {}).items())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def gemm_rate(threads: int, *, seconds: float = 0.6, size: int = 2048, timeout: float = 120) -> dict:
    """Run the GEMM probe in a subprocess with ``threads`` BLAS / torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "latentrt.bench.gemm", "--threads", str(threads), "--size", str(size),
           "--seconds", str(seconds)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=timeout)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def capture(threads: int, *, gemm: bool = True, gemm_seconds: float = 0.6, gemm_size: int = 2048) -> dict:
    return {
        "cpu": cpu_info(),
        "threads": threads,
        "memory": memory_info(),
        "gpu": gpu_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "gemm": gemm_rate(threads, seconds=gemm_seconds, size=gemm_size) if gemm else None,
    }


def floor_rate_gflops(gemm: dict | None, precision: str) -> float | None:
    """The GEMM rate that bounds a component of ``precision`` on the CPU: bf16 uses the bf16 rate;
    fp32 (and fp16, which ONNX Runtime's CPU provider computes in fp32) the best fp32 rate; int8 has no
    probe here (None: no floor is claimed for it)."""
    if not gemm or precision == "int8":
        return None
    if precision == "bf16":
        return gemm.get("torch_bf16_gflops")
    rates = [gemm.get(k) for k in ("numpy_fp32_gflops", "torch_fp32_gflops") if gemm.get(k)]
    return max(rates) if rates else None
