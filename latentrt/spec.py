"""Tensor specs: the single declaration of every component's inputs and outputs.

A :class:`TensorSpec` names a tensor, its dtype and its shape. Each dimension is an int (fixed) or a
symbolic expression over a few named sizes shared by a whole pipeline::

    "B"        batch seen by the component
    "H", "W"   image height / width in pixels
    "H/8"      a size derived from a symbol (integer division, must be exact)
    "2*B"      a multiple of a symbol

From one declaration come the ONNX dynamic axes (:func:`dynamic_axes`), the dummy export inputs
(:func:`make_dummy`), the TensorRT min/opt/max shapes of a profile (:func:`concrete_shape`) and the
runtime's input checks (:func:`check_inputs`). No shape is written twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

Dim = "int | str"

_DIM_RE = re.compile(r"^\s*(?:(\d+)\s*\*\s*)?([A-Za-z_][A-Za-z_0-9]*)\s*(?:/\s*(\d+))?\s*$")

DTYPES = ("float32", "float16", "int64", "int32", "bool")


class SpecError(ValueError):
    """An array does not match the spec of the input it was given for."""


@dataclass(frozen=True)
class SymDim:
    """``mul * symbol / div``."""

    symbol: str
    mul: int = 1
    div: int = 1

    @classmethod
    def parse(cls, text: str) -> "SymDim":
        m = _DIM_RE.match(text)
        if not m:
            raise ValueError(f"bad symbolic dim {text!r}: expected 'S', 'k*S' or 'S/k'")
        return cls(m.group(2), int(m.group(1) or 1), int(m.group(3) or 1))

    def evaluate(self, sizes: Mapping[str, int]) -> int:
        if self.symbol not in sizes:
            raise KeyError(f"no size given for dim symbol {self.symbol!r}")
        value = sizes[self.symbol] * self.mul
        if value % self.div:
            v, step = sizes[self.symbol], self.div // np.gcd(self.mul, self.div)
            raise ValueError(f"{self.symbol}={v} is not a multiple of {step} (dim {self}); the nearest that are: "
                             f"{v - v % step or step} and {v - v % step + step}")
        return value // self.div

    def solve(self, value: int) -> int:
        """The symbol's value that gives ``value`` for this dim."""
        return value * self.div // self.mul

    def __str__(self) -> str:
        text = self.symbol
        if self.mul != 1:
            text = f"{self.mul}*{text}"
        if self.div != 1:
            text = f"{text}/{self.div}"
        return text


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # of int | str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}; known: {DTYPES}")
        for d in self.shape:
            if isinstance(d, str):
                SymDim.parse(d)
            elif not isinstance(d, int):
                raise TypeError(f"{self.name}: dim {d!r} is neither int nor str")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def dims(self):
        return [SymDim.parse(d) if isinstance(d, str) else d for d in self.shape]

    def symbols(self) -> set[str]:
        return {d.symbol for d in self.dims() if isinstance(d, SymDim)}

    def with_dtype(self, dtype: str) -> "TensorSpec":
        return TensorSpec(self.name, dtype, self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def shape_str(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"


def concrete_shape(spec: TensorSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else d.evaluate(sizes) for d in spec.dims())


def dynamic_axes(specs: Iterable[TensorSpec]) -> dict[str, dict[int, str]]:
    """``torch.onnx.export`` dynamic_axes: axis index -> dim name, for every symbolic dim."""
    out = {}
    for s in specs:
        axes = {i: str(d) for i, d in enumerate(s.dims()) if isinstance(d, SymDim)}
        if axes:
            out[s.name] = axes
    return out


def make_dummy(spec: TensorSpec, sizes: Mapping[str, int], rng: np.random.Generator, *, high: int = 1000) -> np.ndarray:
    """A random array matching ``spec`` for the given sizes (integers in [0, high) for int dtypes)."""
    shape = concrete_shape(spec, sizes)
    if spec.dtype.startswith("int"):
        return rng.integers(0, high, size=shape).astype(spec.dtype)
    if spec.dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.standard_normal(shape).astype(spec.dtype)


def bind_sizes(specs: Sequence[TensorSpec], arrays: Mapping[str, Any], *, component: str = "") -> dict[str, int]:
    """Check ``arrays`` against ``specs`` (presence, rank, dtype, fixed dims, consistent symbols).

    Returns the symbol sizes the arrays imply. Raises :class:`SpecError` with a message that names the
    input, what it got and what it expects.
    """
    where = f"{component}: " if component else ""
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise SpecError(
            f"{where}inputs do not match the model: missing {missing}, unexpected {extra}; "
            f"expected {[s.name for s in specs]}"
        )
    sizes: dict[str, int] = {}
    for s in specs:
        a = arrays[s.name]
        shape = tuple(int(x) for x in a.shape)
        if len(shape) != s.rank:
            raise SpecError(f"{where}input {s.name!r} has shape {shape}, expected rank {s.rank} {s.shape_str()}")
        dtype = str(getattr(a, "dtype", "")).replace("torch.", "")
        if dtype != s.dtype:
            raise SpecError(f"{where}input {s.name!r} has dtype {dtype}, expected {s.dtype}")
        for axis, (d, n) in enumerate(zip(s.dims(), shape)):
            if isinstance(d, int):
                if d != n:
                    raise SpecError(
                        f"{where}input {s.name!r} has shape {shape}, expected {s.shape_str()} (axis {axis} must be {d})"
                    )
                continue
            value = d.solve(n)
            if d.evaluate({d.symbol: value}) != n:
                raise SpecError(f"{where}input {s.name!r} axis {axis} = {n} is not of the form {d}")
            if sizes.setdefault(d.symbol, value) != value:
                raise SpecError(
                    f"{where}input {s.name!r} implies {d.symbol}={value} but another input implies "
                    f"{d.symbol}={sizes[d.symbol]}"
                )
    return sizes
