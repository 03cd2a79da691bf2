"""The OpenAI Images API as pure functions: request -> :class:`~latentrt.serve.worker.Job`, results and
errors -> the JSON (and server-sent events) the official ``openai`` client reads.

``POST /v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart: image-to-image, or the
upscaler), ``GET /v1/models``. latentrt's own arguments travel in the client's ``extra_body``:
``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``scheduler`` (a diffusers
class name), and ``strength`` for edits; on LoRA-adapter and FreeU bundles ``lora_scale``, ``lora_weights``
and ``freeu`` (:mod:`.call_options`); on IP-Adapter bundles ``ip_adapter_image`` (base64) and ``ip_adapter_scale``.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .call_options import option_params
from .errors import BadRequest, NotSupported, status_of
from .preview import latent_preview
from .worker import Job

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTRA_NUMBERS = {"seed": int, "num_inference_steps": int, "guidance_scale": float, "strength": float}


@dataclass
class ImagesCall:
    """A parsed request: which model, the job, and how to answer."""

    model: str | None
    job: Job
    stream: bool = False
    partial_images: int = 0
    output_format: str = "png"
    size: str = "auto"
    event_prefix: str = "image_generation"  # "image_edit" for /v1/images/edits


def _number(body: Mapping, name: str, cast, default=None):
    """A number from JSON or a multipart form field (the client sends form fields as text)."""
    v = body.get(name)
    if v is None or v == "":
        return default
    if isinstance(v, bool):
        raise BadRequest(f"{name} must be a number; got {v!r}")
    try:
        out = cast(v)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be {'an integer' if cast is int else 'a number'}; got {v!r}") from None
    if cast is int and isinstance(v, float) and v != out:
        raise BadRequest(f"{name} must be an integer; got {v!r}")
    return out


def _flag(body: Mapping, name: str) -> bool:
    v = body.get(name)
    if isinstance(v, str):
        if v.lower() not in ("true", "false", "1", "0", ""):
            raise BadRequest(f"{name} must be true or false; got {v!r}")
        return v.lower() in ("true", "1")
    return bool(v)


def parse_size(size: Any) -> dict:
    """``"WIDTHxHEIGHT"`` -> height / width arguments; ``"auto"`` or none: the bundle's default."""
    if size in (None, "", "auto"):
        return {}
    if isinstance(size, str) and "x" in size:
        w, _, h = size.lower().partition("x")
        if w.isdigit() and h.isdigit():
            return {"width": int(w), "height": int(h)}
    raise BadRequest(f"size must be 'WIDTHxHEIGHT' (for example '512x512') or 'auto'; got {size!r}")


def _common(body: Mapping, *, edit: bool) -> tuple[dict, dict]:
    """(Job arguments, answer options) shared by generations and edits."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt is required: a non-empty string")
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise NotSupported(f"response_format {fmt!r} is not supported: latentrt returns images inline; "
                           "use response_format='b64_json'")
    if body.get("background") == "transparent":
        raise NotSupported("background='transparent' is not supported; these models draw opaque images")
    if edit and body.get("mask") is not None:
        raise NotSupported("masks (inpainting) are not supported; send the image without a mask for image-to-image")
    output_format = body.get("output_format") or "png"
    if output_format not in FORMATS:
        raise BadRequest(f"output_format must be one of {sorted(FORMATS)}; got {output_format!r}")
    partial = _number(body, "partial_images", int, 0)
    if not 0 <= partial <= 3:
        raise BadRequest(f"partial_images must be in [0, 3]; got {partial}")
    negative = body.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise BadRequest("negative_prompt must be a string")
    scheduler = body.get("scheduler") or None
    if scheduler is not None and not isinstance(scheduler, str):
        raise BadRequest("scheduler must be a diffusers scheduler class name (a string)")
    params = {k: v for k, v in {
        "num_inference_steps": _number(body, "num_inference_steps", int),
        "guidance_scale": _number(body, "guidance_scale", float),
        "scheduler": scheduler,
        **({"strength": _number(body, "strength", float)} if edit else {}),
    }.items() if v is not None}
    params.update(option_params(body))  # lora_scale, lora_weights, freeu (call_options.py)
    ip = body.get("ip_adapter_image")
    if ip is not None:  # an image prompt for IP-Adapter bundles: base64 (an upload field on /edits)
        params["ip_adapter_image"] = decode_image(ip if isinstance(ip, bytes) else _b64(ip, "ip_adapter_image"),
                                                  "ip_adapter_image")
    if body.get("ip_adapter_scale") is not None:
        params["ip_adapter_scale"] = _number(body, "ip_adapter_scale", float)
    job = dict(prompt=prompt, n=_number(body, "n", int, 1), seed=_number(body, "seed", int),
               negative_prompt=negative, params=params)
    answer = dict(model=body.get("model") or None, stream=_flag(body, "stream"), partial_images=partial,
                  output_format=output_format, size=body.get("size") or "auto")
    return job, answer


def generation_call(body: Mapping) -> ImagesCall:
    """``POST /v1/images/generations`` (JSON body)."""
    job, answer = _common(body, edit=False)
    job["params"].update(parse_size(body.get("size")))
    return ImagesCall(job=Job(**job), **answer)


def _b64(text: Any, name: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{name} must be a base64-encoded image (a string)")
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (ValueError, binascii.Error):
        raise BadRequest(f"{name} is not valid base64; send the image file's bytes base64-encoded") from None


def decode_image(data: bytes, name: str = "image"):
    """Upload bytes -> an RGB PIL image, or a 400 naming the problem."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadRequest(f"{name} is empty; send a PNG, JPEG or WebP file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{name} does not decode as an image ({type(e).__name__}: {e}); send a PNG, JPEG or WebP "
                         "file") from None
    return img.convert("RGB")


def edit_call(fields: Mapping, images: list[bytes]) -> ImagesCall:
    """``POST /v1/images/edits``: multipart ``image`` (one file) plus the form fields."""
    job, answer = _common(fields, edit=True)
    if len(images) != 1:
        raise BadRequest(f"send exactly one image file (field 'image'); got {len(images)}")
    image = decode_image(images[0])
    size = parse_size(fields.get("size"))
    if size:  # the result has the input's size: resize the input to the size asked for
        from PIL import Image

        image = image.resize((size["width"], size["height"]), Image.LANCZOS)
    return ImagesCall(job=Job(image=image, **job), event_prefix="image_edit", **answer)


def encode(image, output_format: str = "png") -> str:
    buf = io.BytesIO()
    image.save(buf, format=FORMATS[output_format])
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _nsfw(result, i: int) -> dict:
    """latentrt's extra per-image field: ``nsfw_content_detected`` (true: the safety checker flagged it and
    the image is black), present only when the model's safety checker ran."""
    flags = getattr(result, "nsfw_content_detected", None)
    return {} if flags is None else {"nsfw_content_detected": bool(flags[i])}


def _size_of(image) -> str:
    return f"{image.width}x{image.height}"


def images_response(call: ImagesCall, result) -> dict:
    """The ``ImagesResponse`` JSON (plus a ``latentrt`` object with the seed and the batch size)."""
    return {
        "created": int(time.time()),
        "data": [{"b64_json": encode(im, call.output_format), **_nsfw(result, i)}
                 for i, im in enumerate(result.images)],
        "output_format": call.output_format,
        "size": _size_of(result.images[0]),
        "latentrt": {"seed": result.seed, "batch_images": result.batch_images},
    }


def partial_steps(steps: int, partial_images: int) -> list[int]:
    """The denoising steps after which a stream sends a preview: ``partial_images`` spread evenly
    over the steps before the last (the last one is the final image)."""
    if steps <= 1 or partial_images <= 0:
        return []
    return sorted({min(steps - 1, max(1, round(j * steps / (partial_images + 1)))) for j in range(1, partial_images + 1)})


def _event(call: ImagesCall, kind: str, b64: str, size: str, **extra) -> dict:
    return {"type": f"{call.event_prefix}.{kind}", "b64_json": b64, "created_at": int(time.time()), "size": size,
            "quality": "auto", "background": "opaque", "output_format": call.output_format, **extra}


def partial_events(call: ImagesCall, index: int, latents) -> list[dict]:
    """Preview events for this job's latents after a step (cheap linear decode, latent-grid size)."""
    return [_event(call, "partial_image", encode(im, call.output_format), _size_of(im), partial_image_index=index)
            for im in latent_preview(latents)]


USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}


def completed_events(call: ImagesCall, result) -> list[dict]:
    return [_event(call, "completed", encode(im, call.output_format), _size_of(im), usage=USAGE,
                   latentrt={"seed": result.seed}, **_nsfw(result, i)) for i, im in enumerate(result.images)]


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(status, OpenAI-style ``{"error": {...}}``) for an exception."""
    status, code = status_of(exc)
    kind = "invalid_request_error" if status < 500 else ("server_error" if status == 500 else "service_unavailable")
    message = str(exc) if status != 500 else "internal error; the server log has the details"
    return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}


def models_response(names: list[str]) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "latentrt"}
                                       for n in names]}
