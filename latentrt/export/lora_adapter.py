"""LoRA as adapters (``--lora-mode adapter``): LoRAs kept unfused in the graphs, with per-call scales.

The fused mode (:mod:`latentrt.export.lora`, the default and the fast path) bakes each LoRA into the
weights at its export weight. Here every LoRA stays a low-rank branch of its own next to the layer it
adapts, and the graphs of the UNet and text encoder(s) that carry one take an extra input

    ``lora_scales``: float32, shape (n_loras,), one factor per LoRA of the bundle, in bundle order

so the runtime sets each LoRA's factor per call (``lora_weights={"name": w}`` times the call's
``cross_attention_kwargs={"scale": s}``; 0 switches a LoRA off), as diffusers does with
``load_lora_weights(..., adapter_name=name)``, ``set_adapters(names, adapter_weights=...)`` and the
scale it applies to the UNet and, through ``lora_scale`` in ``encode_prompt``, to the text encoder(s).

A layer adapted by LoRAs 0..k-1 computes, exactly as PEFT's ``lora.Linear`` / ``lora.Conv2d`` do::

    base(x) + sum_i  B_i(A_i(x)) * (alpha_i / r_i) * lora_scales[i]

with the LoRAs' down (A) matrices stacked into one and their up (B) matrices side by side, so one
layer costs two extra matrix products whatever the number of LoRAs (the per-rank factor is applied to
the small rank-sized intermediate). Loading and checking are diffusers' own (:func:`~.lora.load_lora`);
then every PEFT layer is replaced by a :class:`LoraBranch`, and every exported graph whose module
contains one gets the ``lora_scales`` input (:func:`add_lora_inputs`: the plain ``unet``, the
ControlNet / T2I-Adapter residual UNet graphs, ``text_encoder``, ``text_encoder_2``).

LoRA names: ``--lora SRC:WEIGHT:NAME``, or by default the file's (or folder's, or hub repo's) name,
with characters other than letters, digits, ``_`` and ``-`` replaced by ``_``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .. import components as C
from .lora import LORA_COMPONENTS, LoraError, LoraSpec, load_lora

#: the graph input that carries the per-LoRA factors
LORA_SCALES_INPUT = "lora_scales"
#: pipeline kinds whose runtime feeds ``lora_scales`` (their text encoders and UNet graphs)
ADAPTER_KINDS = ("sd", "lcm", "sdxl")
LORA_MODES = ("fused", "adapter")

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class AdapterSpec:
    source: str
    weight: float = 1.0
    name: str | None = None  # None: from the source (default_name)

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        """``SRC``, ``SRC:WEIGHT`` or ``SRC:WEIGHT:NAME`` (WEIGHT a number, NAME letters, digits, _ and -)."""
        if not isinstance(text, str) or not text.strip():
            raise LoraError(f"--lora takes SRC[:WEIGHT[:NAME]]; got {text!r}")
        head, sep, name = text.rpartition(":")
        if sep and head:
            src, sep2, weight = head.rpartition(":")
            if sep2 and src and _is_number(weight):
                if not _NAME_RE.match(name):
                    raise LoraError(f"--lora {text}: the LoRA name {name!r} must be 1-64 letters, digits, '_' or '-'")
                return cls(src, float(weight), name)
        spec = LoraSpec.parse(text)
        return cls(spec.source, spec.weight)

    @classmethod
    def coerce(cls, item) -> "AdapterSpec":
        """An AdapterSpec or LoraSpec, a ``"SRC[:WEIGHT[:NAME]]"`` string, a path, or a ``(source, weight)``
        / ``(source, weight, name)`` tuple."""
        if isinstance(item, AdapterSpec):
            return item
        if isinstance(item, LoraSpec):
            return cls(item.source, item.weight)
        if isinstance(item, str):
            return cls.parse(item)
        if isinstance(item, os.PathLike):
            return cls(os.fspath(item))
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            name = item[2] if len(item) == 3 else None
            if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
                raise LoraError(f"the LoRA name {name!r} must be 1-64 letters, digits, '_' or '-'")
            return cls(os.fspath(item[0]), _weight(item[1], item[0]), name)
        raise TypeError(f"a LoRA is given as 'SRC[:WEIGHT[:NAME]]', a path or (source, weight[, name]); got {item!r}")

    @property
    def resolved_name(self) -> str:
        return self.name or default_name(self.source)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _weight(w, source) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
        raise LoraError(f"LoRA {source}: the weight must be a finite number; got {w!r}")
    return float(w)


def default_name(source: str) -> str:
    """``style.safetensors`` -> ``style``; ``owner/lcm-lora-sdv1-5`` -> ``lcm-lora-sdv1-5``; a folder: its name."""
    p = Path(str(source).rstrip("/\\"))
    stem = p.stem if p.suffix in (".safetensors", ".bin") else p.name
    name = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:64]
    return name or "lora"


class LoraScaleHolder:
    """The running graph's ``lora_scales`` tensor, set by :class:`LoraScalesInput` around each forward
    (so tracing records it as the graph input) and read by every :class:`LoraBranch`."""

    def __init__(self):
        self.scales = None


class LoraBranch(torch.nn.Module):
    """A Linear / Conv2d layer plus its LoRAs as an unfused branch scaled by the graph input."""

    def __init__(self, base: torch.nn.Module, downs, ups, loras: list[int], factors: list[float], holder):
        super().__init__()
        self.base_layer = base
        self.conv = isinstance(base, torch.nn.Conv2d)
        first = downs[0]
        if self.conv:
            for d, u in zip(downs, ups):
                if (d.stride, d.padding, d.dilation, d.groups) != (first.stride, first.padding, first.dilation,
                                                                   first.groups) or tuple(u.kernel_size) != (1, 1) \
                        or tuple(u.stride) != (1, 1) or u.groups != 1:
                    raise LoraError("internal: LoRA convolutions of one layer differ")  # pragma: no cover
            self.stride, self.padding, self.dilation, self.groups = first.stride, first.padding, first.dilation, first.groups
        self.down = torch.nn.Parameter(torch.cat([d.weight.detach() for d in downs], 0), requires_grad=False)
        self.up = torch.nn.Parameter(torch.cat([u.weight.detach() for u in ups], 1), requires_grad=False)
        ranks = [int(d.weight.shape[0]) for d in downs]
        self.register_buffer("rank_lora", torch.tensor([i for i, r in zip(loras, ranks) for _ in range(r)],
                                                       dtype=torch.long), persistent=False)
        self.register_buffer("rank_factor", torch.tensor([f for f, r in zip(factors, ranks) for _ in range(r)],
                                                         dtype=self.down.dtype), persistent=False)
        self.holder = holder

    def forward(self, x):
        scales = self.holder.scales
        if scales is None:
            raise RuntimeError("a LoRA branch ran outside a graph with a lora_scales input")
        y = self.base_layer(x)
        per_rank = scales.to(self.rank_factor.dtype)[self.rank_lora] * self.rank_factor
        if self.conv:
            h = torch.nn.functional.conv2d(x, self.down, None, self.stride, self.padding, self.dilation, self.groups)
            return y + torch.nn.functional.conv2d(h * per_rank[:, None, None], self.up)
        return y + torch.nn.functional.linear(torch.nn.functional.linear(x, self.down) * per_rank, self.up)


class LoraScalesInput(torch.nn.Module):
    """A recipe's wrapper with one more input, ``lora_scales`` (at position ``index``), which it hands
    to the LoRA branches of the model it wraps; the wrapped module gets its own inputs."""

    def __init__(self, inner: torch.nn.Module, index: int, holder: LoraScaleHolder):
        super().__init__()
        self.inner = inner
        self.index = int(index)
        # the holders the wrapped model's branches read: ``holder``, and any other that a copy of the model
        # made (copy.deepcopy copies the holder too: the IP-Adapter's UNet twin is such a copy)
        found = {id(m.holder): m.holder for m in inner.modules() if isinstance(m, LoraBranch)}
        self.holders = list({id(holder): holder, **found}.values())

    @property
    def unet(self):  # what export helpers read off a UNet wrapper (memory_facts)
        return getattr(self.inner, "unet", None)

    def forward(self, *args):
        for h in self.holders:
            h.scales = args[self.index]
        try:
            return self.inner(*args[:self.index], *args[self.index + 1:])
        finally:
            for h in self.holders:
                h.scales = None


@dataclass
class LoraAdapters:
    """The LoRAs loaded as adapters into a pipeline: names, default weights, manifest records."""

    names: list[str]
    weights: list[float]
    records: list[dict]
    holder: LoraScaleHolder
    components: list[str] | None = None  # the graphs given the input (set by add_inputs)

    def add_inputs(self, plans) -> list:
        """Every plan whose module contains a :class:`LoraBranch` gets the ``lora_scales`` input (last)."""
        from .recipes import ComponentPlan

        out, given = [], []
        n = len(self.names)
        for plan in plans:
            if not any(isinstance(m, LoraBranch) for m in plan.module.modules()):
                out.append(plan)
                continue
            spec = C.ComponentSpec(plan.spec.name, (*plan.spec.inputs, C.TensorSpec(LORA_SCALES_INPUT, "float32", (n,))),
                                   plan.spec.outputs)
            module = LoraScalesInput(plan.module, len(plan.spec.inputs), self.holder)
            out.append(ComponentPlan(spec, module, {**plan.value_ranges, LORA_SCALES_INPUT: (0.25, 1.5)}))
            given.append(plan.spec.name)
        self.components = given
        return out

    def manifest_extra(self) -> dict:
        """``manifest.extra["lora_adapter"]``: what the runtime needs (:mod:`latentrt.runtime.pipelines.lora_scales`)."""
        return {"input": LORA_SCALES_INPUT, "names": list(self.names), "weights": list(self.weights),
                "components": list(self.components or [])}


def _peft_layers(model):
    """(parent, attribute, PEFT LoRA layer) for every LoRA layer under ``model``."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                yield parent, attr, child


def _replace_peft_layers(model, adapters: list[str], holder, what: str) -> dict[str, set[int]]:
    """Swap every PEFT LoRA layer of ``model`` for a :class:`LoraBranch`; the ranks seen per adapter."""
    ranks: dict[str, set[int]] = {}
    for parent, attr, layer in _peft_layers(model):
        base = layer.get_base_layer()
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(layer, "fan_in_fan_out", False):
            raise LoraError(f"a LoRA adapts {what} layer {attr} ({type(base).__name__}), which adapter mode does not "
                            "support (Linear and Conv2d layers only); export with --lora-mode fused")
        downs, ups, idx, factors = [], [], [], []
        for i, name in enumerate(adapters):
            if name not in layer.lora_A:
                continue
            if layer.use_dora.get(name, False) or (getattr(layer, "lora_bias", {}) or {}).get(name, False):
                raise LoraError(f"LoRA {name} uses DoRA or a LoRA bias in {what}, which adapter mode does not support; "
                                "export with --lora-mode fused")
            r = layer.r[name]
            denom = math.sqrt(r) if layer.use_rslora.get(name, False) else r
            downs.append(layer.lora_A[name])
            ups.append(layer.lora_B[name])
            idx.append(i)
            factors.append(float(layer.lora_alpha[name]) / denom)  # PEFT's scaling at weight 1
            ranks.setdefault(name, set()).add(int(r))
        if not downs:
            setattr(parent, attr, base)
            continue
        setattr(parent, attr, LoraBranch(base, downs, ups, idx, factors, holder))
    return ranks


def load_lora_adapters(pipe, loras: Iterable, *, kind: str | None = None) -> LoraAdapters:
    """Load every LoRA into ``pipe`` with diffusers' loader and checks (:func:`~.lora.load_lora`), then
    replace the PEFT layers of the UNet and text encoder(s) by :class:`LoraBranch` es. ``pipe`` is
    modified in place. Call :meth:`LoraAdapters.add_inputs` on the recipe's plans afterwards."""
    specs = [AdapterSpec.coerce(x) for x in loras]
    if not specs:
        raise LoraError("adapter mode needs at least one --lora")
    if kind is not None and kind not in ADAPTER_KINDS:
        raise LoraError(f"--lora-mode adapter is supported for {', '.join(ADAPTER_KINDS)} pipelines, not {kind!r}; "
                        "use --lora-mode fused")
    names = [s.resolved_name for s in specs]
    seen: dict[str, str] = {}
    for s, n in zip(specs, names):
        if n in seen:
            raise LoraError(f"two LoRAs are named {n!r} ({seen[n]} and {s.source}); name them with SRC:WEIGHT:NAME, "
                            f"e.g. --lora {s.source}:{s.weight}:{n}_2")
        seen[n] = s.source
    peft_names = [f"lora{i}" for i in range(len(specs))]
    records = []
    for s, peft_name in zip(specs, peft_names):
        records.append(load_lora(pipe, LoraSpec(s.source, s.weight), peft_name))
    holder = LoraScaleHolder()
    ranks: dict[str, set[int]] = {}
    for comp in LORA_COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for k, v in _replace_peft_layers(model, peft_names, holder, comp).items():
            ranks.setdefault(k, set()).update(v)
        if any(hasattr(m, "lora_A") for m in model.modules()):
            raise LoraError(f"internal: PEFT LoRA layers remain in {comp}")  # pragma: no cover
    for rec, s, n, peft_name in zip(records, specs, names, peft_names):
        r = sorted(ranks.get(peft_name, ()))
        rec.update(name=n, mode="adapter", rank=r[0] if len(r) == 1 else r)
    return LoraAdapters(names=names, weights=[float(s.weight) for s in specs], records=records, holder=holder)
