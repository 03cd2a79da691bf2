"""LoRA at export time: fuse one or more LoRAs into the UNet and text encoder before tracing.

The runtime never sees a LoRA: its low-rank update is merged into the base weights, so a bundle
runs at the base model's speed. The loading and merging are diffusers' own
(``load_lora_weights`` with an ``adapter_name`` each, ``set_adapters`` with the weights,
``fuse_lora``, ``unload_lora_weights``), so a bundle equals diffusers with the same LoRAs loaded. That
covers the diffusers/PEFT and kohya-ss safetensors formats (diffusers converts kohya keys), a local
file, a local folder with ``pytorch_lora_weights.safetensors``, or a hub id (``owner/name`` or
``owner/name/weights.safetensors``).

What diffusers does not check, we do: after loading, every LoRA layer of the file must have found a
layer of the model. diffusers raises only when *no* layer matches (peft's
``NoMatchingPeftModuleError``, without naming the file) and silently drops keys of a component
that are absent; here a LoRA whose keys fit nothing is a :class:`LoraError` naming the file, and a
LoRA that fits only partly is one too (it is nearly always a LoRA for another base model).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..manifest import sha256_file

logger = logging.getLogger("latentrt")

#: pipeline components a LoRA can touch, as diffusers names them (and prefixes its keys)
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoraError(ValueError):
    """A LoRA cannot be read or does not fit the model it is fused into."""


@dataclass(frozen=True)
class LoraSpec:
    source: str  # local file, local folder, hub id, or hub id/weight file
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``SRC`` or ``SRC:WEIGHT`` (the weight is the text after the last colon, if it is a number)."""
        if not isinstance(text, str) or not text.strip():
            raise LoraError(f"--lora takes SRC[:WEIGHT]; got {text!r}")
        src, sep, tail = text.rpartition(":")
        if sep and src:
            try:
                return cls(src, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)

    @classmethod
    def coerce(cls, item) -> "LoraSpec":
        """A LoraSpec, an ``"SRC[:WEIGHT]"`` string, a path, or a ``(source, weight)`` pair."""
        if isinstance(item, LoraSpec):
            return item
        if isinstance(item, os.PathLike):
            return cls(os.fspath(item), 1.0)
        if isinstance(item, str):
            return cls.parse(item)
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return cls(os.fspath(item[0]), float(item[1]))
        raise TypeError(f"a LoRA is given as 'SRC[:WEIGHT]', a path or (source, weight); got {item!r}")


def _load_kwargs(source: str) -> tuple[str, dict, str | None]:
    """(what to pass to diffusers, extra kwargs, local file to hash) for a LoRA source."""
    p = Path(source).expanduser()
    if p.is_file():
        return str(p), {}, str(p)
    if p.is_dir():
        return str(p), {}, None
    parts = source.split("/")
    looks_local = source.startswith((".", "/", "~")) or "\\" in source
    if not looks_local and len(parts) == 2 and all(parts) and not parts[1].endswith((".safetensors", ".bin")):
        return source, {}, None  # hub id
    if not looks_local and len(parts) == 3 and all(parts) and parts[2].endswith((".safetensors", ".bin")):
        return "/".join(parts[:2]), {"weight_name": parts[2]}, None  # hub id + weight file
    raise LoraError(f"LoRA {source}: no such file or folder (and not a hub id owner/name[/weights.safetensors])")


def _lora_modules(state_dict: dict) -> dict[str, set[str]]:
    """Module names per component prefix of a (diffusers-converted) LoRA state dict."""
    out: dict[str, set[str]] = {}
    for key in state_dict:
        if ".lora" not in key or key.endswith(".alpha"):
            continue
        module = key.split(".lora", 1)[0]
        prefix, _, rest = module.partition(".")
        out.setdefault(prefix, set()).add(rest)
    return out


def _layers_with_adapter(model, adapter: str) -> set[str]:
    """Names of the model's modules that got a LoRA layer for ``adapter``."""
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})}


def _describe_format(state_dict_keys: Iterable[str]) -> str:
    keys = list(state_dict_keys)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    return "diffusers"


def fuse_loras(pipe, loras: Iterable) -> list[dict]:
    """Load every LoRA into ``pipe`` (each with its weight), fuse them into the weights, unload the
    LoRA layers. Returns one record per LoRA for the manifest (``extra["loras"]``).

    ``pipe`` is modified in place. Raises :class:`LoraError` naming the LoRA when a file is missing,
    is not a LoRA, or does not fit the model.
    """
    specs = [LoraSpec.coerce(x) for x in loras]
    if not specs:
        return []
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraError(f"{type(pipe).__name__} does not take LoRAs (no diffusers LoRA loader)")
    names, weights, records = [], [], []
    for i, spec in enumerate(specs):
        name = f"lora{i}"
        records.append(load_lora(pipe, spec, name))
        names.append(name)
        weights.append(float(spec.weight))
    pipe.set_adapters(names, adapter_weights=weights)
    components = [c for c in LORA_COMPONENTS if any(r["layers"].get(c) for r in records)]
    pipe.fuse_lora(components=components, adapter_names=names)
    pipe.unload_lora_weights()
    for comp in LORA_COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is not None and any(hasattr(m, "lora_A") for m in model.modules()):
            raise LoraError(f"internal: LoRA layers remain in {comp} after fusing")  # pragma: no cover
    logger.info("fused LoRAs %s", ", ".join(f"{r['source']} ({r['weight']})" for r in records))
    return records


def _raw_keys(target: str, kwargs: dict, local_file: str | None) -> list[str] | None:
    """The file's own keys (before diffusers converts them), to record its format; local files only."""
    if not local_file or not local_file.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(local_file, framework="pt") as f:
        return list(f.keys())


def load_lora(pipe, spec: LoraSpec, name: str) -> dict:
    """Load one LoRA into ``pipe`` as PEFT adapter ``name`` (diffusers' ``load_lora_weights``) and check
    that every layer of the file found a layer of the model. Returns its manifest record. Shared by
    :func:`fuse_loras` and the adapter mode (:mod:`latentrt.export.lora_adapter`)."""
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraError(f"{type(pipe).__name__} does not take LoRAs (no diffusers LoRA loader)")
    target, kwargs, local_file = _load_kwargs(spec.source)
    try:
        state_dict, _alphas = pipe.lora_state_dict(target, **kwargs)
    except Exception as e:  # missing hub repo, unreadable file, no weights in the folder
        raise LoraError(f"LoRA {spec.source}: cannot read it ({type(e).__name__}: {e})") from e
    wanted = _lora_modules(state_dict)
    fmt = _describe_format(_raw_keys(target, kwargs, local_file) or state_dict)
    unknown = sorted(set(wanted) - set(LORA_COMPONENTS))
    if unknown:
        raise LoraError(f"LoRA {spec.source}: it has layers for {unknown}, which a "
                        f"{type(pipe).__name__} does not have (a LoRA for another kind of model?)")
    try:
        pipe.load_lora_weights(target, adapter_name=name, **kwargs)
    except Exception as e:
        raise LoraError(
            f"LoRA {spec.source} does not fit this {type(pipe).__name__}: {type(e).__name__}: {e} "
            "(is it a LoRA for another base model, e.g. SD1.x vs SD2.x vs SDXL?)"
        ) from e
    layers = {}
    for comp, modules in wanted.items():
        model = getattr(pipe, comp, None)
        adapted = _layers_with_adapter(model, name) if model is not None else set()
        layers[comp] = len(adapted)
        # published text encoder keys say "text_model.", which transformers 5 models no longer have
        missing = sorted(m for m in modules if m not in adapted and m.removeprefix("text_model.") not in adapted)
        if missing:
            raise LoraError(
                f"LoRA {spec.source}: only {len(modules) - len(missing)} of its {len(modules)} {comp} layers "
                f"fit a layer of this model (not found: {missing[0]!r}{', ...' if len(missing) > 1 else ''}); "
                "it is a LoRA for another base model (SD1.x vs SD2.x vs SDXL?) or a format diffusers does not "
                "convert"
            )
    if not any(layers.values()):
        raise LoraError(f"LoRA {spec.source}: none of its keys fit a layer of the UNet or text encoder")
    return {"source": spec.source, "weight": float(spec.weight), "format": fmt, "layers": layers,
            **({"sha256": sha256_file(local_file)} if local_file else {})}
