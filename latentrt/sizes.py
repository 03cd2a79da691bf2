"""The image sizes a bundle supports, and the messages that refuse the others.

A bundle's manifest constants record, in pixels per side (the latent upscaler: *input* pixels):

    size_multiple   sides are multiples of this: the VAE factor (8) for bundles whose UNet takes its
                    upsample sizes from the skip tensors (every size diffusers renders); older bundles
                    recorded the UNet's overall factor (64 for SD1.5), their graphs take only those
    min_size        the smallest side (the UNet's smallest size with one latent at its lowest level)
    max_size        the largest side (from the export's default/trace size or its profile; ``latentrt
                    export --max-size``)
    max_batch       the most images one call makes (``--max-batch``)

Bundles written before the range was recorded have no ``min_size`` / ``max_size`` / ``max_batch``:
they keep their ``size_multiple`` rule and no bounds (:meth:`SizeRange.from_constants`).
Pure stdlib: the runtime, export and profiles all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class SizeRange:
    multiple: int
    min: int | None = None
    max: int | None = None
    max_batch: int | None = None
    #: the VAE factor: a side that is not a multiple of it is no image size at all
    vae_scale_factor: int = 8

    @classmethod
    def from_constants(cls, k: Mapping, vae_scale_factor: int | None = None) -> "SizeRange":
        f = int(vae_scale_factor or k.get("vae_scale_factor", 8))

        def opt(key):
            return None if k.get(key) is None else int(k[key])

        return cls(int(k.get("size_multiple", f)), opt("min_size"), opt("max_size"), opt("max_batch"), f)

    @property
    def recorded(self) -> bool:
        """False for bundles exported before the range was recorded (the old rule applies)."""
        return self.max is not None

    def describe(self, unit: str = "px") -> str:
        lo = self.min if self.min is not None else self.multiple
        hi = f"{self.max} {unit}" if self.max is not None else "any size"
        return f"{lo} to {hi} per side in multiples of {self.multiple}"

    def valid(self, v: int) -> bool:
        return (v > 0 and v % self.multiple == 0 and (self.min is None or v >= self.min)
                and (self.max is None or v <= self.max))

    def nearest(self, v: int) -> list[int]:
        """The valid sides nearest to ``v`` (one or two, ascending)."""
        m = self.multiple
        lo = self.min if self.min is not None else m
        lo += -lo % m
        hi = None if self.max is None else self.max - self.max % m
        if v <= lo:
            return [lo]
        if hi is not None and v >= hi:
            return [hi]
        down, up = v - v % m, v + (-v % m)
        return sorted({down, up})

    def problem(self, name: str, v, *, unit: str = "px", fix_max: str = "") -> str | None:
        """Why side ``name`` = ``v`` is refused (None if it is not), naming the range and the nearest
        valid sizes. ``fix_max`` is appended when ``v`` is above the maximum (how to raise it)."""
        if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "dtype") and v.dtype.kind in "iu") \
                or v <= 0:
            return f"{name} must be a positive integer; got {v!r}"
        v = int(v)
        if self.valid(v):
            return None
        near = " or ".join(map(str, self.nearest(v)))
        f = self.vae_scale_factor
        if v % f:
            return f"{name}={v} is not a multiple of {f}; use {near}"
        if v % self.multiple:
            if not self.recorded:  # an old bundle: its graph takes only multiples of the UNet's factor
                return (f"{name}={v} is not a multiple of {self.multiple}, which this bundle's UNet needs (its latents "
                        f"are downsampled {self.multiple // f}x); use {near} (bundles exported by this version of "
                        f"latentrt take every multiple of {f})")
            return f"{name}={v} is not a multiple of {self.multiple}; this bundle takes {self.describe(unit)}; use {near}"
        where = "below" if self.min is not None and v < self.min else "above"
        return (f"{name}={v} {unit} is {where} the sizes this bundle supports ({self.describe(unit)}); use {near}"
                + (fix_max if where == "above" else ""))

    def batch_problem(self, n: int) -> str | None:
        if self.max_batch is None or n <= self.max_batch:
            return None
        return (f"this call makes {n} images (prompts x num_images_per_prompt), more than the {self.max_batch} this "
                f"bundle supports (max_batch); split the call, or re-export with `latentrt export --max-batch N`")


MAX_SIZE_HINT = "; re-export with `latentrt export --max-size N` for larger images"

#: without a profile or ``--max-size``, a bundle takes sides up to this many times its default (or
#: trace) size: 2048 px for SD1.5, 4096 for SDXL
MAX_SIZE_FACTOR = 4
#: without a profile or ``--max-batch``: the most images one call makes
DEFAULT_MAX_BATCH = 16


def bundle_size_limits(k: Mapping, *, trace_size: int | None = None, profile=None, max_size: int | None = None,
                       max_batch: int | None = None) -> dict:
    """The size constants an export records: ``min_size`` / ``max_size`` / ``max_batch`` and the default
    size moved inside them, from the recipe's constants ``k`` (``size_multiple``, ``min_size``, a
    recipe's own ``max_size``, ``default_*``), then a shape profile's ``H`` / ``W`` / ``B`` ranges,
    then explicit ``max_size`` / ``max_batch`` (``latentrt export --max-size/--max-batch``)."""
    m = int(k["size_multiple"])
    lo = int(k.get("min_size", m))
    default = max(int(k["default_height"]), int(k["default_width"]))
    hi = int(k["max_size"]) if k.get("max_size") is not None else MAX_SIZE_FACTOR * max(default, trace_size or 0)
    batch = DEFAULT_MAX_BATCH
    if profile is not None:
        sides = [profile.dims[s] for s in ("H", "W") if s in profile.dims]
        if sides:
            lo, hi = max(lo, min(r.min for r in sides)), max(r.max for r in sides)
        if "B" in profile.dims:
            batch = profile.dims["B"].max
    lo += -lo % m
    hi -= hi % m
    if max_size is not None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size % m or max_size < lo:
            raise ValueError(f"max_size must be a multiple of {m} of at least {lo} (this pipeline's smallest size); "
                             f"got {max_size!r}")
        hi = max_size
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer; got {max_batch!r}")
        batch = max_batch
    if hi < lo:
        raise ValueError(f"the profile's sizes (up to {hi} px) are below this pipeline's smallest size {lo} px")
    out = {"min_size": lo, "max_size": hi, "max_batch": int(batch)}
    for key in ("default_height", "default_width"):
        out[key] = min(max(int(k[key]), lo), hi)
    return out
