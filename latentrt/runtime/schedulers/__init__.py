"""Diffusion schedulers of the runtime: pure functions over arrays, each matched to its diffusers twin.

Usage (what diffusers' pipelines do, with the step counter made explicit)::

    sched = get_scheduler(bundle_scheduler_config)            # or name="EulerAncestralDiscreteScheduler"
    plan = sched.plan(num_inference_steps, strength=strength)
    latents = randn(shape) * plan.init_noise_sigma             # text-to-image
    # latents = sched.add_noise(plan, image_latents, randn(shape))   # image-to-image
    state = sched.init_state(plan)
    for i, t in enumerate(plan.timesteps):
        model_output = unet(sched.scale_model_input(plan, i, latents), t, ...)
        noise = randn(model_output.shape) if sched.noise_needed(plan, i) else None
        latents, denoised, state = sched.step(plan, i, model_output, latents, state, noise=noise)
    # LCM: decode `denoised` of the last step (equal to latents there)

numpy only; arrays may be numpy, torch or cupy (coefficients are Python floats).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .base import Plan, Scheduler, StepOutput, UnknownSchedulerError
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler, DPMState
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler, PNDMState

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        LCMScheduler,
        DDIMScheduler,
        PNDMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
        DDPMScheduler,
    )
}

# "<class>+karras" selects use_karras_sigmas=True for the classes that have it
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    f"{name}+karras": (name, {"use_karras_sigmas": True})
    for name, cls in SCHEDULERS.items()
    if "use_karras_sigmas" in cls.config_keys()
}


def known_names() -> list[str]:
    return [*SCHEDULERS, *ALIASES]


def get_scheduler(config: Mapping[str, Any], name: str | None = None) -> Scheduler:
    """Build a scheduler from a diffusers ``scheduler_config.json`` dict.

    ``name`` (a diffusers class name, or an alias such as ``"DPMSolverMultistepScheduler+karras"``)
    overrides ``config["_class_name"]``. diffusers' ``XScheduler.from_config(pipe.scheduler.config)``
    rule: keys the config contains carry over to the target class (those it understands; unknown keys
    are ignored), keys it does not contain take the *target* class's defaults. A diffusers config dict
    lists the keys its scheduler took from defaults in ``_use_default_values``; those count as not
    contained. So pass a ``scheduler_config.json`` as published (its own keys), not one re-serialised
    with every default written out (see :func:`undecidable_keys`).
    """
    target = name if name is not None else config.get("_class_name")
    if target is None:
        raise UnknownSchedulerError(
            "the scheduler config has no '_class_name' and no name was given; "
            f"known schedulers: {', '.join(known_names())}"
        )
    overrides: dict[str, Any] = {}
    if target in ALIASES:
        target, overrides = ALIASES[target]
    cls = SCHEDULERS.get(target)
    if cls is None:
        raise UnknownSchedulerError(
            f"unknown scheduler {target!r}; the latentrt runtime implements: {', '.join(known_names())}"
        )
    return cls.from_config(config, **overrides)


def _defaults(cls: type[Scheduler]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init and f.default is not dataclasses.MISSING}


def undecidable_keys(config: Mapping[str, Any], name: str) -> dict[str, tuple[Any, Any]]:
    """For a config re-serialised with every key of its class written out (``save_config``, as
    bundles before published configs were kept): the keys whose value for scheduler ``name`` it
    cannot tell. They are keys both classes take, with different defaults, that the config holds at
    its own class's default: had the published file left them out, diffusers gives ``name``'s
    default; had it set them, the value carries over. Returns ``{key: (source default, target
    default)}``; empty when ``name`` is the config's own class or nothing is in doubt.
    """
    target, overrides = ALIASES.get(name, (name, {}))
    source = SCHEDULERS.get(config.get("_class_name"))
    cls = SCHEDULERS.get(target)
    if source is None or cls is None or source is cls:
        return {}
    src, tgt = _defaults(source), _defaults(cls)
    return {k: (src[k], tgt[k]) for k in sorted(src.keys() & tgt.keys() - overrides.keys())
            if src[k] != tgt[k] and config.get(k, src[k]) == src[k]}


__all__ = [
    "ALIASES",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMState",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "PNDMScheduler",
    "PNDMState",
    "Plan",
    "SCHEDULERS",
    "Scheduler",
    "StepOutput",
    "UnknownSchedulerError",
    "get_scheduler",
    "known_names",
    "undecidable_keys",
]
