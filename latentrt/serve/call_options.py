"""Request fields for the per-call options of LoRA-adapter and FreeU bundles, shared by both APIs.

OpenAI requests (extra body fields, as with ``seed``): ``lora_scale`` (a number, diffusers'
``cross_attention_kwargs={"scale": s}``), ``lora_weights`` (``{"name": weight}``) and ``freeu``
(``[s1, s2, b1, b2]``). A1111 requests: its prompt syntax ``<lora:NAME:WEIGHT>`` (WEIGHT defaults to 1),
taken out of the prompt and turned into ``lora_weights``, plus the same ``freeu`` field. The values are
checked here for their JSON shape only; the pipeline's own checks (the bundle's LoRA names, whether its
UNet takes FreeU) run before the request queues, so a bad value is a 400 and never fails a batch.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from .errors import BadRequest

#: the worker's batch-compatible arguments these fields add (requests batch only when they agree)
OPTION_PARAMS = ("lora_scale", "lora_weights", "freeu")
#: the image-prompt arguments (api_openai.py reads them), which the SD-family pipelines take through their
#: conditioning ``**kwargs`` rather than named parameters
IP_PARAMS = ("ip_adapter_image", "ip_adapter_scale")

_EXPECTED = {"lora_scale": "a finite number", "lora_weights": 'an object of LoRA name -> weight (JSON)',
             "freeu": "a list of four numbers [s1, s2, b1, b2] (JSON)"}
_LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?>")


def _real(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"{name} must be a finite number; got {v!r}")
    return float(v)


def lora_weights_field(v: Any) -> dict[str, float] | None:
    if v is None:
        return None
    if not isinstance(v, Mapping) or not v:
        raise BadRequest(f'lora_weights must be an object of LoRA name -> weight, e.g. {{"style": 0.7}}; got {v!r}')
    return {str(k): _real(f"lora_weights[{k!r}]", w) for k, w in v.items()}


def freeu_field(v: Any) -> list[float] | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 4:
        raise BadRequest(f"freeu must be a list of four numbers [s1, s2, b1, b2], e.g. [0.9, 0.2, 1.5, 1.6]; got {v!r}")
    return [_real(f"freeu[{i}]", x) for i, x in enumerate(v)]


def _field(body: Mapping, name: str) -> Any:
    """``body[name]``; a multipart form (the edits endpoint) carries it as JSON text."""
    v = body.get(name)
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            raise BadRequest(f"{name} must be {_EXPECTED[name]}; got {v!r}") from None
    return v


def option_params(body: Mapping, lora_weights: dict[str, float] | None = None) -> dict:
    """The worker params of the option fields present in ``body`` (``lora_weights`` from A1111 tags)."""
    weights = lora_weights_field(_field(body, "lora_weights"))
    if lora_weights:
        if weights:
            raise BadRequest("give LoRA weights either as <lora:NAME:WEIGHT> in the prompt or as lora_weights, not both")
        weights = lora_weights
    scale = _field(body, "lora_scale")
    out = {"lora_weights": weights, "freeu": freeu_field(_field(body, "freeu")),
           "lora_scale": None if scale is None else _real("lora_scale", scale)}
    return {k: v for k, v in out.items() if v is not None}


def a1111_lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """``"a cat <lora:style:0.7>"`` -> ``("a cat", {"style": 0.7})`` (A1111's prompt syntax)."""
    weights: dict[str, float] = {}
    for m in _LORA_TAG.finditer(prompt):
        name, w = m.group(1).strip(), m.group(2)
        try:
            weights[name] = 1.0 if w is None or not w.strip() else float(w)
        except ValueError:
            raise BadRequest(f"<lora:{name}:{w}> in the prompt: the weight must be a number, e.g. <lora:{name}:0.8>") \
                from None
        if not math.isfinite(weights[name]):
            raise BadRequest(f"<lora:{name}:{w}>: the weight must be finite")
    return " ".join(_LORA_TAG.sub(" ", prompt).split()), weights
