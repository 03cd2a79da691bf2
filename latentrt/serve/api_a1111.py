"""The AUTOMATIC1111 web UI API (``/sdapi/v1/...``) as pure functions: request JSON -> Job,
results -> the JSON its clients read, the sampler names it uses -> runtime scheduler names.

What latentrt cannot do (hires fix, face restoration, tiling, masks, scripts, subseeds) answers 501
naming the field, never a silently different image. As in the library, a request's seed drives all
of its ``batch_size * n_iter`` images (one generator), and ``info.all_seeds`` repeats it.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Mapping

from .api_openai import decode_image, encode
from .call_options import a1111_lora_tags, option_params
from .errors import BadRequest, NotSupported, status_of
from .worker import Job

#: A1111 sampler name -> diffusers scheduler class the runtime implements
SAMPLERS = {
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DDIM": "DDIMScheduler",
    "PLMS": "PNDMScheduler",
    "DDPM": "DDPMScheduler",
    "LCM": "LCMScheduler",
}
#: A1111 schedule types; "karras" selects the runtime's "<class>+karras" alias where one exists
SCHEDULES = {"automatic": "Automatic", "karras": "Karras"}
#: fields that ask for something latentrt does not do, with the value that means "off"
UNSUPPORTED = {"enable_hr": False, "restore_faces": False, "tiling": False, "mask": None, "script_name": None,
               "alwayson_scripts": {}, "subseed_strength": 0, "refiner_checkpoint": None, "inpainting_fill": 0}


def scheduler_name(sampler: Any, schedule: Any = None, known: list[str] | None = None) -> str | None:
    """A1111's ``sampler_name`` (+ ``scheduler``: schedule type) -> the runtime's scheduler name;
    diffusers class names pass through. ``None``: the bundle's own scheduler."""
    schedule = (schedule or "automatic").lower()
    if schedule not in SCHEDULES:
        raise BadRequest(f"scheduler (schedule type) {schedule!r} is not supported; use one of {sorted(SCHEDULES)}")
    if sampler in (None, ""):
        if schedule != "automatic":
            raise BadRequest("a schedule type needs a sampler_name (for example 'DPM++ 2M')")
        return None
    if not isinstance(sampler, str):
        raise BadRequest("sampler_name must be a string")
    if sampler.endswith(" Karras"):  # the old combined names, "DPM++ 2M Karras"
        sampler, schedule = sampler[: -len(" Karras")], "karras"
    name = SAMPLERS.get(sampler, sampler)
    if schedule == "karras":
        name += "+karras"
    if known is not None and name not in known:
        raise BadRequest(f"sampler {sampler!r} (schedule {schedule!r}) is not available; GET /sdapi/v1/samplers and "
                         "/sdapi/v1/schedulers list what is")
    return name


def _int(body: Mapping, name: str, default=None):
    v = body.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise BadRequest(f"{name} must be an integer; got {v!r}")
    return int(v)


def _float(body: Mapping, name: str):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"{name} must be a number; got {v!r}")
    return float(v)


def _image(b64: Any):
    if not isinstance(b64, str):
        raise BadRequest("init_images must be a list of base64 image strings")
    data = b64.split(",", 1)[1] if b64.startswith("data:") else b64
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("init_images[0] is not valid base64") from None
    return decode_image(raw, "init_images[0]")


def model_of(body: Mapping) -> str | None:
    """The model a request asks for: ``override_settings.sd_model_checkpoint`` (A1111) or ``model``."""
    override = body.get("override_settings") or {}
    if not isinstance(override, Mapping):
        raise BadRequest("override_settings must be an object")
    return override.get("sd_model_checkpoint") or body.get("model") or None


def job(body: Mapping, *, img2img: bool, known_schedulers: list[str] | None = None) -> Job:
    """``/sdapi/v1/txt2img`` or ``/img2img`` JSON -> the Job."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in (None, off) and bool(body.get(name)):
            raise NotSupported(f"{name} is not supported by latentrt; leave it out (or {off!r})")
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    prompt, lora_tags = a1111_lora_tags(prompt)  # <lora:NAME:WEIGHT> (call_options.py)
    seed = _int(body, "seed", -1)
    n = (_int(body, "batch_size", 1) or 1) * (_int(body, "n_iter", 1) or 1)
    params = {k: v for k, v in {
        "num_inference_steps": _int(body, "steps"),
        "guidance_scale": _float(body, "cfg_scale"),
        "scheduler": scheduler_name(body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler"),
                                    known_schedulers),
    }.items() if v is not None}
    params.update(option_params(body, lora_tags))
    image = None
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise BadRequest("img2img needs init_images: a list with one base64 image")
        image = _image(images[0])
        width, height = _int(body, "width"), _int(body, "height")
        if width and height and (width, height) != image.size:
            from PIL import Image

            image = image.resize((width, height), Image.LANCZOS)
        strength = _float(body, "denoising_strength")
        if strength is not None:
            params["strength"] = strength
    else:
        params.update({k: v for k, v in (("width", _int(body, "width")), ("height", _int(body, "height"))) if v})
    negative = body.get("negative_prompt") or None
    if negative is not None and not isinstance(negative, str):
        raise BadRequest("negative_prompt must be a string")
    return Job(prompt=prompt, n=n, seed=None if seed is None or seed < 0 else seed, negative_prompt=negative,
               image=image, params=params)


def response(body: Mapping, job: Job, result, model: str) -> dict:
    im = result.images[0]
    info = {"prompt": job.prompt, "negative_prompt": job.negative_prompt or "", "seed": result.seed,
            "all_seeds": [result.seed] * len(result.images), "width": im.width, "height": im.height,
            "sampler_name": body.get("sampler_name"), "sd_model_name": model, "batch_size": len(result.images),
            **{k: v for k, v in job.params.items() if k != "scheduler"}}
    if getattr(result, "nsfw_content_detected", None) is not None:  # the safety checker ran (serve --safety-checker)
        info["nsfw_content_detected"] = [bool(x) for x in result.nsfw_content_detected]
    return {"images": [encode(x) for x in result.images], "parameters": dict(body), "info": json.dumps(info)}


def samplers(known: list[str]) -> list[dict]:
    return [{"name": a1111, "aliases": [cls], "options": {}} for a1111, cls in SAMPLERS.items() if cls in known]


def schedules(known: list[str]) -> list[dict]:
    out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
    if any(k.endswith("+karras") for k in known):
        out.append({"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False})
    return out


def progress(worker, preview_b64: str | None) -> dict:
    """``/sdapi/v1/progress`` for the worker running now (or idle)."""
    import time

    p = dict(worker.progress) if worker is not None else {"step": 0, "steps": 0, "started": None}
    step, steps = p["step"], p["steps"]
    frac = step / steps if steps else 0.0
    eta = (time.monotonic() - p["started"]) * (steps - step) / step if p.get("started") and step else 0.0
    jobs = worker.queued + worker.running if worker is not None else 0
    return {"progress": frac, "eta_relative": eta, "current_image": preview_b64, "textinfo": None,
            "state": {"skipped": False, "interrupted": False, "job": "", "job_count": jobs, "job_timestamp": "0",
                      "job_no": 0, "sampling_step": step, "sampling_steps": steps}}


def error_body(exc: BaseException) -> tuple[int, dict]:
    status, code = status_of(exc)
    detail = str(exc) if status != 500 else "internal error; the server log has the details"
    return status, {"error": code, "detail": detail}
