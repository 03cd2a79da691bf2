"""Type and value checks of the call arguments every pipeline shares, by name, before a call starts.

A pipeline's own checks say what fits its model (``clip_skip`` in the encoder's range, a size the
UNet can take); these say what no pipeline can use: a guidance scale that is not a finite number, a
step count that is not a positive integer, latents that are not a finite float array. They run
first (:meth:`BasePipeline.__init_subclass__` wraps each pipeline's ``__call__``), so a hostile
value gets one clear message naming the argument instead of an error from deep inside numpy.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

#: most denoising steps a call may ask for (diffusers' schedules are 1000 training steps long)
MAX_STEPS = 1000


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def positive_int(name: str, v, *, most: int | None = None, phrase: str = "a positive integer") -> None:
    if not _is_int(v) or v < 1:
        raise ValueError(f"{name} must be {phrase}; got {v!r}")
    if most is not None and v > most:
        raise ValueError(f"{name} must be at most {most}; got {v!r}")


def steps(name: str, v) -> None:
    positive_int(name, v, most=MAX_STEPS, phrase="an integer >= 1")


def finite_number(name: str, v, lo: float | None = None, hi: float | None = None) -> None:
    if not _is_real(v):
        raise TypeError(f"{name} must be a finite number; got {v!r}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number; got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}]; got {v!r}")


def float_array(name: str, v) -> None:
    """A numeric array (numpy, or a device tensor with a shape), finite."""
    if hasattr(v, "shape") and not isinstance(v, np.ndarray) and type(v).__module__.startswith("torch"):
        return  # device tensors (the device loop) are checked by the engines
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be a numpy array; got {type(v).__name__}")
    if v.dtype.kind not in "fiu" or v.ndim == 0:
        raise TypeError(f"{name} must be a numeric array with a shape; got dtype {v.dtype}, shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def sequence_of_numbers(name: str, v) -> None:
    if not isinstance(v, (list, tuple, np.ndarray)) or not len(v) or not all(
            _is_real(x) and math.isfinite(float(x)) for x in v):
        raise TypeError(f"{name} must be a non-empty list of finite numbers; got {v!r}")


def optional(check: Callable) -> Callable:
    return lambda name, v: None if v is None else check(name, v)


def _nonnegative_int(name, v):
    if not _is_int(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {v!r}")


def _str_name(name, v):
    if not isinstance(v, str) or not v:
        raise TypeError(f"{name} must be a non-empty str; got {v!r}")


#: argument name -> check(name, value); arguments not named here are left to the pipelines
CHECKS: dict[str, Callable[[str, Any], None]] = {
    "num_inference_steps": optional(steps),
    "prior_num_inference_steps": optional(steps),
    "original_inference_steps": optional(steps),
    "num_images_per_prompt": positive_int,
    "guidance_scale": finite_number,
    "prior_guidance_scale": finite_number,
    "guidance_rescale": lambda n, v: finite_number(n, v, 0.0, 1.0),
    "eta": lambda n, v: finite_number(n, v, 0.0, 1.0),
    "aesthetic_score": finite_number,
    "negative_aesthetic_score": finite_number,
    "denoising_end": optional(lambda n, v: finite_number(n, v, 0.0, 1.0)),
    "clip_skip": optional(_nonnegative_int),
    "timesteps": optional(sequence_of_numbers),
    "scheduler": optional(lambda n, v: None if not isinstance(v, (str, bytes)) and hasattr(v, "plan")
                          else _str_name(n, v)),
    **{k: optional(float_array) for k in ("latents", "prior_latents", "prompt_embeds", "negative_prompt_embeds",
                                          "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "image_embeds")},
}


def check_arguments(arguments: dict[str, Any]) -> None:
    for name, value in arguments.items():
        check = CHECKS.get(name)
        if check is not None:
            check(name, value)
