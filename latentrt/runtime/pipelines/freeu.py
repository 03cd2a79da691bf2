"""FreeU per call: ``pipe(..., freeu=(s1, s2, b1, b2))`` and ``enable_freeu`` / ``disable_freeu``.

diffusers' ``enable_freeu(s1, s2, b1, b2)`` sets the UNet's FreeU factors (see
:mod:`latentrt.export.freeu`); here they are the UNet graph's ``freeu`` input, which bundles exported
with ``--freeu`` (``export_bundle(..., freeu=True)``) have. A call's ``freeu`` overrides the pipeline's
default (set by ``enable_freeu``; ``freeu=False`` turns it off for the call). Without FreeU the graph
gets the identity ``(1, 1, 1, 1)``, which computes diffusers' UNet without FreeU exactly; so does a
value with a zero factor, since diffusers' up blocks run FreeU only when all four factors are truthy.
Bundles exported without ``--freeu`` run their plain UNet graph, unchanged.
"""

from __future__ import annotations

import numbers

import numpy as np

FREEU_INPUT = "freeu"
IDENTITY = np.ones(4, np.float32)
REEXPORT = ("re-export the bundle with `latentrt export SRC -o OUT --freeu` (Python: export_bundle(..., freeu=True)), "
            "which gives the UNet graph a freeu input")


class FreeUError(ValueError):
    pass


def check_freeu(value) -> tuple[float, float, float, float]:
    """``(s1, s2, b1, b2)``: four finite real numbers (a sequence, or a ``"S1,S2,B1,B2"`` string)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise FreeUError(f"freeu takes four numbers S1,S2,B1,B2 (e.g. 0.9,0.2,1.5,1.6); got {value!r}") from None
    try:
        items = list(value)
    except TypeError:
        raise FreeUError(f"freeu must be (s1, s2, b1, b2), four numbers, or None; got {value!r}") from None
    if len(items) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in items):
        raise FreeUError(f"freeu must be (s1, s2, b1, b2), four numbers, e.g. (0.9, 0.2, 1.5, 1.6) for SD1.5; "
                         f"got {value!r}")
    out = tuple(float(v) for v in items)
    if not all(np.isfinite(out)):
        raise FreeUError(f"freeu factors must be finite; got {value!r}")
    return out  # type: ignore[return-value]


def _takes_freeu(spec) -> bool:
    return any(s.name == FREEU_INPUT for s in spec.inputs)


class FreeUOption:
    """Mixin of :class:`~.base.BasePipeline`: FreeU defaults, the call's choice (in its CallState), and
    the ``freeu`` input of every UNet graph the call runs."""

    freeu_default: tuple | None = None  # an instance attribute once enable_freeu / disable_freeu ran

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU on by default for this pipeline's calls (diffusers' ``pipe.enable_freeu``)."""
        value = check_freeu((s1, s2, b1, b2))
        self._require_freeu_input()
        self.freeu_default = value

    def disable_freeu(self) -> None:
        self.freeu_default = None

    def _require_freeu_input(self) -> None:
        unet = self.bundle.manifest.components.get("unet")
        if unet is None or not _takes_freeu(unet.spec):
            raise FreeUError(f"{self.bundle.path}: FreeU needs a UNet graph with a freeu input, and this bundle's has "
                             f"none; {REEXPORT}")

    def check_freeu_argument(self, freeu=None) -> tuple | None:
        """The FreeU factors a call with ``freeu`` runs (None: the pipeline's default; False: off), or a
        :class:`FreeUError`; no state changes (a server checks a request with it before queueing)."""
        if freeu is None:
            value = self.freeu_default
        elif freeu is False:
            value = None
        else:
            value = check_freeu(freeu)
            self._require_freeu_input()
        if value is not None and not all(value):  # diffusers: FreeU runs only when s1 and s2 and b1 and b2
            value = None
        return value

    def set_freeu(self, freeu=None) -> None:
        """This thread's call: ``freeu`` (None: the pipeline's default; False: off)."""
        self._call.freeu = self.check_freeu_argument(freeu)

    def freeu_inputs(self, component: str, spec_inputs, inputs: dict) -> dict:
        """``inputs`` plus the ``freeu`` input when the component's graph takes one. A UNet graph
        without it (a ControlNet UNet added to the bundle later) refuses a call that asks for FreeU."""
        value = getattr(self._call, "freeu", None)
        if FREEU_INPUT in inputs:
            return inputs
        if any(s.name == FREEU_INPUT for s in spec_inputs):
            return {**inputs, FREEU_INPUT: IDENTITY if value is None else np.asarray(value, np.float32)}
        if value is not None and (component == "unet" or component.startswith("unet_")):
            raise FreeUError(f"{self.bundle.path}: this call asks for FreeU but the {component} graph has no freeu "
                             f"input; {REEXPORT}")
        return inputs
