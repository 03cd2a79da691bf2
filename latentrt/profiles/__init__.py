"""Shape / precision profiles: which sizes an engine serves, in which precision, built how.

A profile is a TOML file (the packaged ones sit beside this module; users pass their own path)::

    name = "sd15-lcm-dynamic"
    pipeline = "lcm"                  # the bundle kind it is meant for (a mismatch is reported)
    [dims]                            # one range per named dim, shared by every input that uses it
    B = [1, 1, 4]                     # [min, opt, max], or one int for a static dim
    H = [256, 512, 1024]
    W = [256, 512, 1024]
    [precision]                       # per component; "default" for the others
    default = "fp16"
    vae_decoder = "fp32"
    [batch_multiplier]                # classifier-free guidance doubles what the UNet sees
    unet = 2
    [builder]                         # TensorRT builder options
    workspace_gib = 8
    optimization_level = 3
    timing_cache = true
    [shapes.unet.sample]              # optional, TensorRT-style explicit shapes of one input
    min = [2, 4, 32, 32]
    opt = [2, 4, 64, 64]
    max = [8, 4, 128, 128]

Shapes are never written per input unless the user wants to: they are derived from the component
specs the bundle's manifest stores (:mod:`latentrt.spec`), so ``("B", 4, "H/8", "W/8")`` with
``H = [256, 512, 1024]`` gives the UNet's ``sample`` min/opt/max = (1,4,32,32)/(1,4,64,64)/(1,4,128,128).

Validation: a named dim must have exactly one range. ``H = [...]`` and ``"H/8" = [...]`` in
``[dims]`` that disagree, or an explicit ``[shapes]`` entry that implies another range for a dim
than ``[dims]`` (or than another input) is an error naming both sources. ``min <= opt <= max``.
Pure stdlib (``tomllib``): the runtime and the CLI read profiles without numpy or torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ..spec import SymDim

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRECISIONS = ("fp32", "fp16")
PROFILE_DIR = Path(__file__).resolve().parent
_TOP_KEYS = {"name", "description", "pipeline", "dims", "precision", "batch_multiplier", "builder", "shapes"}


class ProfileError(ValueError):
    """A profile file is malformed, inconsistent, or does not fit a bundle's components."""


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.opt, self.max)):
            raise ProfileError(f"a dim range takes integers; got {self.as_list()}")
        if not 0 < self.min <= self.opt <= self.max:
            raise ProfileError(f"a dim range needs 0 < min <= opt <= max; got {self.as_list()}")

    @property
    def static(self) -> bool:
        return self.min == self.max

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    def scaled(self, mul: int) -> "DimRange":
        return DimRange(self.min * mul, self.opt * mul, self.max * mul)

    def __str__(self) -> str:
        return str(self.min) if self.static else f"[{self.min}, {self.opt}, {self.max}]"


@dataclass(frozen=True)
class BuilderOptions:
    """TensorRT builder settings. Precision is not here: strongly typed networks take it from the
    ONNX graph (TensorRT 11 has no FP16 builder flag)."""

    workspace_gib: float = 4.0
    optimization_level: int = 3  # 0..5, TensorRT's default is 3
    timing_cache: bool = True

    def __post_init__(self):
        if not isinstance(self.workspace_gib, (int, float)) or isinstance(self.workspace_gib, bool) or self.workspace_gib <= 0:
            raise ProfileError(f"builder.workspace_gib must be a positive number; got {self.workspace_gib!r}")
        if not isinstance(self.optimization_level, int) or not 0 <= self.optimization_level <= 5:
            raise ProfileError(f"builder.optimization_level must be an integer in 0..5; got {self.optimization_level!r}")
        if not isinstance(self.timing_cache, bool):
            raise ProfileError(f"builder.timing_cache must be true or false; got {self.timing_cache!r}")

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * (1 << 30))


@dataclass(frozen=True)
class InputShapes:
    """min/opt/max shapes of one input, as TensorRT's ``IOptimizationProfile.set_shape`` takes them."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Profile:
    name: str
    dims: Mapping[str, DimRange]
    description: str = ""
    pipeline: str | None = None
    precision: Mapping[str, str] = field(default_factory=dict)  # component -> precision
    default_precision: str = "fp32"
    batch_multiplier: Mapping[str, int] = field(default_factory=dict)
    builder: BuilderOptions = field(default_factory=BuilderOptions)
    shapes: Mapping[str, Mapping[str, InputShapes]] = field(default_factory=dict)  # component -> input -> shapes
    path: str | None = None

    # -- what a component gets ------------------------------------------------------------------
    def precision_for(self, component: str) -> str:
        return self.precision.get(component, self.default_precision)

    def component_precisions(self, components) -> dict[str, str]:
        return {c: self.precision_for(c) for c in components}

    def ranges_for(self, spec) -> dict[str, DimRange]:
        """The range of every dim symbol ``spec`` (a ComponentSpec) uses, after the batch multiplier
        and the explicit ``[shapes]`` of its inputs (which must agree with ``[dims]``)."""
        mul = self.batch_multiplier.get(spec.name, 1)
        ranges: dict[str, DimRange] = {}
        origin: dict[str, str] = {}
        for sym, r in self.dims.items():
            ranges[sym] = r.scaled(mul) if sym == "B" else r
            origin[sym] = "[dims]" + (f" x batch_multiplier {mul}" if sym == "B" and mul != 1 else "")
        by_name = {s.name: s for s in spec.inputs}
        for input_name, shp in self.shapes.get(spec.name, {}).items():
            if input_name not in by_name:
                raise ProfileError(f"profile {self.name!r}: [shapes.{spec.name}.{input_name}] names no input of "
                                   f"{spec.name} (its inputs: {', '.join(by_name)})")
            s = by_name[input_name]
            where = f"[shapes.{spec.name}.{input_name}]"
            for key in ("min", "opt", "max"):
                if len(getattr(shp, key)) != s.rank:
                    raise ProfileError(f"profile {self.name!r}: {where}.{key} has rank {len(getattr(shp, key))}; "
                                       f"{spec.name}.{input_name} is {s.shape_str()}")
            for axis, d in enumerate(s.dims()):
                vals = (shp.min[axis], shp.opt[axis], shp.max[axis])
                if isinstance(d, int):
                    if vals != (d, d, d):
                        raise ProfileError(f"profile {self.name!r}: {where} axis {axis} must be {d} "
                                           f"({spec.name}.{input_name} is {s.shape_str()}); got {list(vals)}")
                    continue
                r = _solve_range(d, vals, f"profile {self.name!r}: {where} axis {axis}")
                if d.symbol in ranges and ranges[d.symbol] != r:
                    raise ProfileError(
                        f"profile {self.name!r}: dim {d.symbol} has two ranges: {ranges[d.symbol]} from "
                        f"{origin[d.symbol]} and {r} from {where} axis {axis}; give each named dim one range"
                    )
                ranges.setdefault(d.symbol, r)
                origin.setdefault(d.symbol, f"{where} axis {axis}")
        used = {sym for s in (*spec.inputs, *spec.outputs) for sym in s.symbols()}
        missing = sorted(used - set(ranges))
        if missing:
            users = [f"{spec.name}.{s.name} {s.shape_str()}" for s in spec.inputs if set(missing) & s.symbols()]
            raise ProfileError(f"profile {self.name!r} has no range for dim(s) {', '.join(missing)} used by "
                               f"{'; '.join(users)}; add them under [dims]")
        return {sym: ranges[sym] for sym in sorted(used)}

    def shapes_for(self, spec) -> dict[str, InputShapes]:
        """min/opt/max of every input of ``spec``, derived from its symbolic dims."""
        ranges = self.ranges_for(spec)
        out = {}
        for s in spec.inputs:
            shapes = []
            for key in ("min", "opt", "max"):
                sizes = {sym: getattr(r, key) for sym, r in ranges.items()}
                try:
                    shapes.append(tuple(d if isinstance(d, int) else d.evaluate(sizes) for d in s.dims()))
                except ValueError as e:
                    raise ProfileError(f"profile {self.name!r}: {spec.name}.{s.name} {s.shape_str()} at {key} "
                                       f"sizes: {e}") from None
            out[s.name] = InputShapes(*shapes)
        return out

    def limits_for(self, spec) -> dict[str, tuple[int, int]]:
        """{symbol: (min, max)} an engine built from this profile accepts (Engine.limits)."""
        return {sym: (r.min, r.max) for sym, r in self.ranges_for(spec).items()}

    def to_dict(self) -> dict:
        """Canonical, JSON-able form: what engine-cache keys hash."""
        return {
            "name": self.name,
            "pipeline": self.pipeline,
            "dims": {k: v.as_list() for k, v in sorted(self.dims.items())},
            "precision": {"default": self.default_precision, **dict(sorted(self.precision.items()))},
            "batch_multiplier": dict(sorted(self.batch_multiplier.items())),
            "builder": {"workspace_gib": self.builder.workspace_gib,
                        "optimization_level": self.builder.optimization_level},
            "shapes": {c: {i: s.as_dict() for i, s in sorted(v.items())} for c, v in sorted(self.shapes.items())},
        }

    def summary(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        prec = self.default_precision + "".join(f", {k}={v}" for k, v in self.precision.items())
        mult = "".join(f", {k} batch x{v}" for k, v in self.batch_multiplier.items())
        return f"{dims}; {prec}{mult}"


def _solve_range(d: SymDim, values, where: str) -> DimRange:
    solved = []
    for v in values:
        s = d.solve(int(v))
        if d.evaluate({d.symbol: s}) != v:
            raise ProfileError(f"{where}: {v} is not of the form {d}")
        solved.append(s)
    try:
        return DimRange(*solved)
    except ProfileError as e:
        raise ProfileError(f"{where}: {e}") from None


def _parse_range(value: Any, where: str) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value, value)
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ProfileError(f"{where} must be an integer or [min, opt, max] of integers; got {value!r}")


def _table(data: dict, key: str, path: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ProfileError(f"{path}: [{key}] must be a table; got {value!r}")
    return value


def parse_profile(data: dict, *, source: str = "<profile>") -> Profile:
    """Validate a decoded TOML document and build a :class:`Profile`."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ProfileError(f"{source}: unknown key(s) {unknown}; a profile has {sorted(_TOP_KEYS)}")
    name = data.get("name") or Path(source).stem
    where = f"profile {name!r} ({source})"

    dims: dict[str, DimRange] = {}
    origin: dict[str, str] = {}
    raw_dims = _table(data, "dims", where)
    if not raw_dims:
        raise ProfileError(f"{where}: [dims] is empty; give at least B, H and W (e.g. B = 1, H = 512, W = 512)")
    for key, value in raw_dims.items():
        try:
            d = SymDim.parse(key)
        except ValueError as e:
            raise ProfileError(f"{where}: [dims] key {key!r}: {e}") from None
        vals = _parse_range(value, f"{where}: dims.{key}")
        try:
            r = _solve_range(d, vals, f"{where}: dims.{key}")
        except ProfileError:
            raise
        if d.symbol in dims and dims[d.symbol] != r:
            raise ProfileError(
                f"{where}: dim {d.symbol} has two ranges: {dims[d.symbol]} (from dims.{origin[d.symbol]}) and {r} "
                f"(from dims.{key}); give each named dim one range"
            )
        dims[d.symbol] = r
        origin.setdefault(d.symbol, key)

    prec = dict(_table(data, "precision", where))
    default = prec.pop("default", "fp32")
    for comp, p in {"default": default, **prec}.items():
        if p not in PRECISIONS:
            raise ProfileError(f"{where}: precision.{comp} must be one of {PRECISIONS}; got {p!r}")

    mult = dict(_table(data, "batch_multiplier", where))
    for comp, m in mult.items():
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ProfileError(f"{where}: batch_multiplier.{comp} must be a positive integer; got {m!r}")

    b = _table(data, "builder", where)
    known_b = {"workspace_gib", "optimization_level", "timing_cache"}
    if set(b) - known_b:
        raise ProfileError(f"{where}: unknown builder option(s) {sorted(set(b) - known_b)}; known: {sorted(known_b)}")
    try:
        builder = BuilderOptions(**b)
    except ProfileError as e:
        raise ProfileError(f"{where}: {e}") from None

    shapes: dict[str, dict[str, InputShapes]] = {}
    for comp, inputs in _table(data, "shapes", where).items():
        if not isinstance(inputs, dict):
            raise ProfileError(f"{where}: [shapes.{comp}] must be a table of inputs")
        for inp, shp in inputs.items():
            w = f"{where}: [shapes.{comp}.{inp}]"
            if not isinstance(shp, dict) or set(shp) != {"min", "opt", "max"}:
                raise ProfileError(f"{w} needs exactly min, opt and max (lists of ints)")
            tup = []
            for k in ("min", "opt", "max"):
                v = shp[k]
                if not isinstance(v, list) or not all(isinstance(x, int) and x > 0 for x in v):
                    raise ProfileError(f"{w}.{k} must be a list of positive integers; got {v!r}")
                tup.append(tuple(v))
            if len({len(t) for t in tup}) != 1 or not all(a <= o <= m for a, o, m in zip(*tup)):
                raise ProfileError(f"{w}: min <= opt <= max must hold on every axis (same rank); got {shp}")
            shapes.setdefault(comp, {})[inp] = InputShapes(*tup)

    return Profile(
        name=str(name), dims=MappingProxyType(dims), description=str(data.get("description", "")),
        pipeline=data.get("pipeline"), precision=MappingProxyType(prec), default_precision=default,
        batch_multiplier=MappingProxyType(mult), builder=builder,
        shapes=MappingProxyType({k: MappingProxyType(v) for k, v in shapes.items()}), path=source,
    )


def available_profiles() -> dict[str, Path]:
    """Packaged profiles: name (file stem) -> path."""
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml"))}


def load_profile(name_or_path: str | Path) -> Profile:
    """A packaged profile by name (``sd15-lcm-512``) or a user's TOML file by path."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or path.is_file() or "/" in text:
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
    else:
        known = available_profiles()
        if text not in known:
            raise ProfileError(f"unknown profile {text!r}; packaged profiles: {', '.join(known)} "
                               "(or pass the path of your own .toml file; `latentrt profiles` lists them)")
        path = known[text]
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML ({e})") from None
    return parse_profile(data, source=str(path))


def profile_fingerprint(profile: Profile) -> str:
    return json.dumps(profile.to_dict(), sort_keys=True, separators=(",", ":"))


__all__ = ["BuilderOptions", "DimRange", "InputShapes", "Profile", "ProfileError", "available_profiles", "export_precision",
           "load_profile", "parse_profile", "profile_fingerprint"]


def export_precision(profile: "str | Profile | None", precision: str | None = None,
                     overrides: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """(precision, per-component overrides) for ``export_bundle``: the profile's, then ``precision``
    (replaces the profile's default and its per-component entries) and ``overrides`` on top."""
    overrides = dict(overrides or {})
    if profile is None:
        return precision or "fp32", overrides
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if precision is not None:
        return precision, overrides
    return prof.default_precision, {**dict(prof.precision), **overrides}
