"""Memory limits: refuse an engine call that cannot fit in the memory available, before it runs.

Without this a call far too large for the machine (``height=width=4096`` on a bundle made for 512)
ends in ONNX Runtime's own allocation error after seconds of work, or in the kernel's OOM killer.
Here the peak memory of each call is estimated from the component's specs and the input shapes,
and compared with what this process may still allocate; a call that cannot fit fails at once with
the largest size (and batch) that does.

The estimate (:func:`estimate`) is the sum of

- the call's inputs and outputs (from the specs, at the call's sizes);
- the activations of its widest level, ``LIVE_ACTIVATIONS`` tensors of ``B x channels x tokens``;
- self-attention at its largest level: ``ATTENTION_COPIES`` float32 score matrices of shape
  ``(B * heads, tokens, tokens)``, which is what dominates UNets (the first attention level of an
  SD1.5 UNet has 4096 tokens at 512x512 and 262144 at 4096x4096: 2 TiB of scores for 8 heads).

Levels, channels and heads are recorded at export (``extra["memory"]`` of a component entry, see
:mod:`latentrt.export.memory_facts`); a bundle exported before that gets SD1.5's architecture
(:data:`FALLBACK`). Weights are not counted: they are loaded before the call (and so are already out
of the memory available).

The memory available (:func:`available_memory`) is the least of ``MemAvailable`` (/proc/meminfo, or
psutil), the cgroup's limit less its usage (v2 and v1), the address-space limit (``RLIMIT_AS``) less
the process's current address space, and ``$LATENTRT_MEMORY_LIMIT`` (bytes, or with a K/M/G/T
suffix) when set. numpy only, no engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..spec import SpecError, SymDim, TensorSpec, concrete_shape

#: tensors of the widest level alive at once (input, output, normalization and residual temporaries)
LIVE_ACTIVATIONS = 4
#: attention score matrices alive at once (scores and softmax probabilities)
ATTENTION_COPIES = 2
FLOAT_BYTES = 4  # CPU engines compute fp16 graphs in fp32 too
ENV_LIMIT = "LATENTRT_MEMORY_LIMIT"

#: SD1.5's levels, for components of bundles exported without a memory record
FALLBACK = {
    "unet": {"input": "sample", "levels": [[1, 320, 8], [0.5, 640, 8], [0.25, 1280, 8], [0.125, 1280, 0]]},
    "vae_decoder": {"input": "latent_sample", "levels": [[1, 512, 1], [2, 512, 0], [4, 256, 0], [8, 128, 0]]},
    "vae_encoder": {"input": "sample", "levels": [[1, 128, 0], [0.5, 256, 0], [0.25, 512, 0], [0.125, 512, 1]]},
}


class MemoryLimitError(ValueError):
    """A call needs more memory than this process may allocate."""


# -- what is available ----------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ValueError(f"${ENV_LIMIT} must be a number of bytes (e.g. 8G, 512M); got {text!r}") from None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _meminfo(key: str) -> int | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_headroom() -> int | None:
    """The cgroup's memory limit less its usage (cgroup v2, else v1), when it has a limit."""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":  # v2
            base = f"/sys/fs/cgroup{path.rstrip('/')}"
            limit, usage = _read(f"{base}/memory.max"), _read(f"{base}/memory.current")
        elif "memory" in controllers.split(","):  # v1
            base = f"/sys/fs/cgroup/memory{path.rstrip('/')}"
            limit, usage = _read(f"{base}/memory.limit_in_bytes"), _read(f"{base}/memory.usage_in_bytes")
            if limit is None:
                limit, usage = _read("/sys/fs/cgroup/memory/memory.limit_in_bytes"), _read(
                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")
        else:
            continue
        if limit is None or usage is None or limit.strip() == "max" or int(limit) >= 1 << 60:
            continue
        return max(0, int(limit) - int(usage))
    return None


def _address_space_headroom() -> int | None:
    """``RLIMIT_AS`` less the address space this process already maps (VmSize), when limited."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmSize:"):
            used = int(line.split()[1]) * 1024
    return max(0, soft - used)


def available_memory() -> tuple[int, str]:
    """(bytes this process may still allocate, which limit that is)."""
    found: list[tuple[int, str]] = []
    avail = _meminfo("MemAvailable")
    if avail is None:
        try:
            import psutil

            avail = psutil.virtual_memory().available
        except ImportError:  # pragma: no cover - no /proc and no psutil: nothing known
            avail = None
    if avail is not None:
        found.append((avail, "MemAvailable"))
    cg = _cgroup_headroom()
    if cg is not None:
        found.append((cg, "the cgroup's memory limit"))
    aspace = _address_space_headroom()
    if aspace is not None:
        found.append((aspace, "the address-space limit (RLIMIT_AS)"))
    env = os.environ.get(ENV_LIMIT)
    if env:
        found.append((parse_bytes(env), f"${ENV_LIMIT}"))
    return min(found) if found else (1 << 62, "no known limit")


# -- what a call needs ------------------------------------------------------------------------------
def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def memory_record(name: str, entry: Any) -> dict | None:
    """The component's recorded levels (``extra["memory"]``), else SD1.5's for the known components."""
    extra = getattr(entry, "extra", None) or {}
    return extra.get("memory") or FALLBACK.get(name)


def _nbytes(spec: TensorSpec, sizes: Mapping[str, int]) -> int:
    import numpy as np

    n = 1
    for d in concrete_shape(spec, sizes):
        n *= d
    return n * np.dtype(spec.dtype).itemsize


def estimate(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], record: Mapping | None,
             sizes: Mapping[str, int]) -> tuple[int, str]:
    """(estimated peak bytes of one call at ``sizes``, what dominates it)."""
    io = sum(_nbytes(s, sizes) for s in (*inputs, *outputs))
    parts = [(io, "inputs and outputs")]
    spec = next((s for s in inputs if record and s.name == record.get("input")), None)
    if spec is not None and spec.rank == 4:
        b, _, h, w = concrete_shape(spec, sizes)
        for scale, channels, heads in record.get("levels", []):
            tokens = max(1, int(h * scale)) * max(1, int(w * scale))
            parts.append((LIVE_ACTIVATIONS * b * int(channels) * tokens * FLOAT_BYTES,
                          f"activations of {channels} channels over {tokens} positions"))
            if heads:
                parts.append((ATTENTION_COPIES * b * int(heads) * tokens * tokens * FLOAT_BYTES,
                              f"attention scores of {heads} head(s) over {tokens} tokens"))
    total = io + max(p[0] for p in parts[1:]) if len(parts) > 1 else io
    return total, max(parts)[1]


def call_sizes(specs: Sequence[TensorSpec], arrays: Mapping[str, Any]) -> dict[str, int] | None:
    """The symbol sizes the arrays imply (no dtype or consistency checks: the engine makes those);
    None when a shape does not fit its spec."""
    sizes: dict[str, int] = {}
    for s in specs:
        shape = getattr(arrays.get(s.name), "shape", None)
        if shape is None or len(shape) != s.rank:
            return None
        for d, n in zip(s.dims(), shape):
            if isinstance(d, SymDim):
                sizes.setdefault(d.symbol, d.solve(int(n)))
    return sizes


def _fits(inputs, outputs, record, sizes, budget) -> bool:
    try:
        return estimate(inputs, outputs, record, sizes)[0] <= budget
    except (SpecError, ValueError, KeyError):
        return False


def _largest(fits, hi: int) -> int:
    """The largest k in [1, hi] with fits(k) (fits is monotonic), 0 when none."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


#: copies of a per-image array that a call holds at once (the array, the UNet's batch built from it)
ARRAY_COPIES = 2


def check_allocation(shape: Sequence[int], what: str, itemsize: int = FLOAT_BYTES) -> None:
    """Refuse an array of ``shape`` that cannot fit twice (the per-image copies of the prompt embeddings
    or the noise of a huge ``num_images_per_prompt``; the call holds it and the UNet's batch made from
    it), before numpy tries to allocate it."""
    n = itemsize
    for d in shape:
        n *= int(d)
    if n < 1 << 26:  # 64 MiB: not worth reading the limits
        return
    budget, source = available_memory()
    if ARRAY_COPIES * n > budget:
        raise MemoryLimitError(f"{what} of shape {tuple(shape)} need {human(ARRAY_COPIES * n)} ({ARRAY_COPIES} copies), "
                               f"but only {human(budget)} is available ({source}); use fewer images per prompt "
                               "(or fewer prompts)")


def check_engines(engines: Mapping[str, Any], manifest, sizes: Mapping[str, int] | None, names=None, *,
                  size_multiple: int = 8) -> None:
    """:func:`check` each named engine (all of them by default) whose specs' symbols ``sizes`` gives."""
    if sizes is None:
        return
    available = None
    for name in names or list(engines):
        engine = engines[name]
        symbols = set().union(*(s.symbols() for s in (*engine.inputs, *engine.outputs)))
        if not symbols <= set(sizes):
            continue
        available = available or available_memory()
        check(name, engine.inputs, engine.outputs, memory_record(name, manifest.components.get(name)),
              {k: v for k, v in sizes.items() if k in symbols}, size_multiple=size_multiple, available=available)


def check(component: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], record: Mapping | None,
          sizes: Mapping[str, int], *, size_multiple: int = 8, available: tuple[int, str] | None = None) -> None:
    """Raise :class:`MemoryLimitError` when a call of ``component`` at ``sizes`` cannot fit."""
    need, what = estimate(inputs, outputs, record, sizes)
    budget, source = available or available_memory()
    if need <= budget:
        return
    shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
    advice = []
    if "H" in sizes and "W" in sizes:
        m = max(1, int(size_multiple))
        k = _largest(lambda k: _fits(inputs, outputs, record, {**sizes, "H": k * m, "W": k * m}, budget),
                     max(sizes["H"], sizes["W"]) // m)
        advice.append(f"the largest square size that fits at this batch is {k * m}x{k * m}" if k
                      else "no image size fits at this batch")
    if sizes.get("B", 1) > 1:
        b = _largest(lambda b: _fits(inputs, outputs, record, {**sizes, "B": b}, budget), sizes["B"] - 1)
        advice.append(f"at this size a batch of at most {b} fits (the batch counts every image, twice with "
                      "classifier-free guidance)" if b else "no batch fits at this size")
    raise MemoryLimitError(
        f"{component}: this call ({shown}) needs about {human(need)} (mostly {what}), but only {human(budget)} "
        f"is available ({source}); " + "; ".join(advice or ["free memory or use a smaller call"])
        + ". Use a smaller height/width or fewer images per prompt"
    )
