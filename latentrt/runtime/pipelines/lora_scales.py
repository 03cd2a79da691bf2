"""Per-call LoRA scales of bundles exported with ``--lora-mode adapter``.

Such a bundle keeps its LoRAs unfused (:mod:`latentrt.export.lora_adapter`): each graph that carries
LoRA branches (the UNet graphs, the text encoder(s)) takes ``lora_scales``, float32 (n_loras,), one
factor per LoRA in the order of ``manifest.extra["lora_adapter"]["names"]``. A call's factor for LoRA
``name`` is

    ``lora_weights.get(name, export-time weight) * scale``

where ``scale`` is ``cross_attention_kwargs={"scale": s}`` (or its alias ``lora_scale=s``, default
1), which is what diffusers computes with ``load_lora_weights(..., adapter_name=name)``,
``set_adapters(names, adapter_weights=...)`` and ``cross_attention_kwargs={"scale": s}``: the scale
applies to the UNet and, through ``lora_scale`` in ``encode_prompt``, to the text encoder(s) too.
A weight of 0 switches a LoRA off.

The factors are state of the call (:class:`~.base.CallState`, one per thread), so one pipeline
serves concurrent calls with different LoRA weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...manifest import REEXPORT_HINT

LORA_SCALES_INPUT = "lora_scales"


class LoraArgumentError(ValueError):
    """A call's LoRA arguments do not fit the bundle (unknown name, not a number, no adapters)."""


def _number(what: str, v) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise LoraArgumentError(f"{what} must be a number; got {v!r} ({type(v).__name__})")
    if not math.isfinite(float(v)):
        raise LoraArgumentError(f"{what} must be a finite number; got {v!r}")
    return float(v)


def _table(manifest) -> tuple[list[str], list[float]] | None:
    """(names, default weights) of the bundle's LoRA adapters, checked (a bundle is untrusted); None
    when it has none."""
    info = (manifest.extra or {}).get("lora_adapter")
    if not info:
        return None
    names, weights = info.get("names"), info.get("weights")
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names) or not isinstance(weights, list) or len(weights) != len(names)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
        from ...manifest import BundleError

        raise BundleError(f"the bundle's extra.lora_adapter record is malformed ({info!r}); {REEXPORT_HINT}")
    return list(names), [float(w) for w in weights]


def resolve_lora_scales(table, cross_attention_kwargs: Any = None, lora_scale: Any = None,
                        lora_weights: Any = None) -> np.ndarray | None:
    """The call's ``lora_scales`` vector (float32), or None for a bundle without LoRA adapters
    (``table`` None), where only the identity scale 1 is accepted."""
    scale = None
    if cross_attention_kwargs is not None:
        if not isinstance(cross_attention_kwargs, dict):
            raise LoraArgumentError(f"cross_attention_kwargs must be a dict such as {{'scale': 0.5}}; got "
                                    f"{type(cross_attention_kwargs).__name__}")
        other = sorted(str(k) for k in cross_attention_kwargs if k != "scale")
        if other:
            raise LoraArgumentError(f"cross_attention_kwargs takes only 'scale' (the LoRA scale) in latentrt; got "
                                    f"{other} (attention-processor arguments are not part of an exported graph)")
        if "scale" in cross_attention_kwargs:
            scale = _number("cross_attention_kwargs['scale']", cross_attention_kwargs["scale"])
    if lora_scale is not None:
        s = _number("lora_scale", lora_scale)
        if scale is not None and s != scale:
            raise LoraArgumentError(f"lora_scale={s} and cross_attention_kwargs['scale']={scale} disagree; pass one "
                                    "of them (lora_scale is an alias)")
        scale = s
    if lora_weights is not None and not isinstance(lora_weights, dict):
        raise LoraArgumentError(f"lora_weights must be a dict of LoRA name -> weight, e.g. {{'style': 0.7}}; got "
                                f"{type(lora_weights).__name__}")
    if table is None:
        if lora_weights:
            raise LoraArgumentError(
                f"lora_weights={lora_weights!r}: this bundle has no LoRA adapters (a LoRA fused at export has a fixed "
                "weight); export with `--lora FILE:WEIGHT[:NAME] --lora-mode adapter` to set LoRA weights per call")
        if scale is not None and scale != 1.0:
            raise LoraArgumentError(
                f"a LoRA scale of {scale} needs LoRA adapters, which this bundle does not have (LoRAs fused at "
                "export are not scaled per call); export with `--lora FILE:WEIGHT[:NAME] --lora-mode adapter`")
        return None
    names, weights = table
    by_name = dict(zip(names, weights))
    for name, w in (lora_weights or {}).items():
        if name not in by_name:
            raise LoraArgumentError(f"lora_weights names a LoRA {name!r} that this bundle does not have; its LoRAs "
                                    f"are {names}")
        by_name[name] = _number(f"lora_weights[{name!r}]", w)
    s = 1.0 if scale is None else scale
    return np.asarray([by_name[n] * s for n in names], dtype=np.float32)


class LoraScales:
    """Mixin of :class:`~.base.BasePipeline`: the call's LoRA factors and the graph inputs that carry them."""

    @property
    def lora_names(self) -> list[str]:
        """Names of the bundle's LoRA adapters (empty for bundles without: no LoRA, or fused ones)."""
        table = _table(self.bundle.manifest)
        return table[0] if table else []

    def check_lora_arguments(self, cross_attention_kwargs: Any = None, lora_scale: Any = None,
                             lora_weights: Any = None) -> np.ndarray | None:
        """The ``lora_scales`` these arguments give (None: a bundle without LoRA adapters), or a
        :class:`LoraArgumentError`; no state changes (a server checks a request with it before queueing)."""
        return resolve_lora_scales(_table(self.bundle.manifest), cross_attention_kwargs, lora_scale, lora_weights)

    def select_loras(self, cross_attention_kwargs: Any = None, lora_scale: Any = None, lora_weights: Any = None):
        """Check the call's LoRA arguments and make them this call's (this thread's) factors."""
        self._call.lora_scales = self.check_lora_arguments(cross_attention_kwargs, lora_scale, lora_weights)

    def lora_inputs(self, component: str) -> dict[str, np.ndarray]:
        """``{"lora_scales": ...}`` when ``component``'s graph takes it (else {}): the call's factors, or
        the export-time weights when no call selected any."""
        entry = self.bundle.manifest.components.get(component)
        if entry is None or not any(s.name == LORA_SCALES_INPUT for s in entry.spec.inputs):
            return {}
        scales = getattr(self._call, "lora_scales", None)
        if scales is None:
            scales = resolve_lora_scales(_table(self.bundle.manifest))
            if scales is None:
                from ...manifest import BundleError

                raise BundleError(f"{self.bundle.path}: component {component} takes {LORA_SCALES_INPUT} but the "
                                  f"manifest lists no LoRA adapters (extra.lora_adapter); {REEXPORT_HINT}")
        return {LORA_SCALES_INPUT: scales}
