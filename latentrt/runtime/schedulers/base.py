"""What every runtime scheduler shares: the training schedule, plans, steps, array helpers.

A scheduler is an immutable description built from a diffusers ``scheduler_config.json``. It has no
step counter: :meth:`Scheduler.plan` returns the timesteps (and per-step scalars) of one generation,
and :meth:`Scheduler.step` is a pure function of ``(plan, i, model_output, sample, state, noise)``.
Multistep history lives in an immutable ``state`` value that each step returns.

Precision. Every per-step coefficient is computed from the float32 training schedule with numpy
float32 scalar arithmetic, mirroring the float32 torch ops diffusers uses, then handed over as a
Python float. Arrays (numpy, torch or cupy) are only combined with ``+ - * /`` and a scalar or another
array, so the same code runs on every array library and keeps the sample's dtype. The betas and
cumulative products are reproduced bit for bit (torch's CPU ``linspace`` uses a fused multiply-add;
its ``cumprod`` accumulates in float64).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import Any, ClassVar, Mapping, NamedTuple

import numpy as np

logger = logging.getLogger("latentrt.schedulers")

f32 = np.float32
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class UnknownSchedulerError(ValueError):
    """The scheduler name is not one the runtime implements."""


class StepOutput(NamedTuple):
    prev_sample: Any
    denoised: Any  # the model's estimate of the clean sample (None where diffusers has none)
    state: Any  # pass to the next step


def _readonly(a: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Plan:
    """The steps of one generation, as diffusers' pipeline ends up iterating them.

    ``timesteps[i]`` is what the UNet gets as ``timestep`` at step ``i``. Schedules indexed by
    position (sigmas) use ``begin_index + i`` into the full, uncut schedule.
    """

    timesteps: np.ndarray
    num_inference_steps: int  # as set_timesteps got it, before an image-to-image cut
    init_noise_sigma: float
    begin_index: int = 0  # position of timesteps[0] in schedule_timesteps / sigmas
    schedule_timesteps: np.ndarray | None = None  # the full schedule, before the strength cut
    sigmas: np.ndarray | None = None  # float32, len(schedule_timesteps) + 1 (sigma schedulers)

    def __post_init__(self):
        object.__setattr__(self, "timesteps", _readonly(self.timesteps))
        full = self.timesteps if self.schedule_timesteps is None else self.schedule_timesteps
        object.__setattr__(self, "schedule_timesteps", _readonly(full))
        object.__setattr__(self, "sigmas", _readonly(self.sigmas))

    def __len__(self) -> int:
        return len(self.timesteps)

    def sigma(self, i: int) -> float:
        """The sigma of step ``i`` (sigma schedulers only)."""
        return float(self.sigmas[self.begin_index + i])


# ---------------------------------------------------------------------------------------------
# the training schedule, exactly as diffusers computes it in float32 torch


def _round_f32(x: Fraction) -> np.float32:
    """Round an exact rational to the nearest float32 (ties to even)."""
    r = f32(float(x))
    cands = [r, np.nextafter(r, f32(-np.inf)), np.nextafter(r, f32(np.inf))]

    def key(c):
        return (abs(Fraction(float(c)) - x), int(np.array(c, f32).view(np.uint32)) & 1)

    return min(cands, key=key)


@lru_cache(maxsize=32)
def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    torch computes ``start + step*i`` (first half) and ``end - step*(steps-1-i)`` (second half) with
    a fused multiply-add in float32.
    """
    if steps == 1:
        return np.array([start], f32)
    s, e = f32(start), f32(end)
    step = Fraction(float((e - s) / f32(steps - 1)))
    first, last = Fraction(float(s)), Fraction(float(e))
    half = steps // 2
    out = [_round_f32(first + step * i if i < half else last - step * (steps - 1 - i)) for i in range(steps)]
    return np.array(out, f32)


def torch_cumprod_f32(a: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 tensor on CPU (it accumulates in float64)."""
    return np.cumprod(a.astype(np.float64)).astype(f32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.array(betas, f32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas = f32(1.0) - betas
    sqrt_ac = np.sqrt(torch_cumprod_f32(alphas))
    s0, sT = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - sT) * (s0 / (s0 - sT))
    alphas_bar = sqrt_ac * sqrt_ac
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return f32(1.0) - alphas


def make_betas(cfg) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.array(cfg.trained_betas, f32)
    elif cfg.beta_schedule == "linear":
        betas = torch_linspace_f32(cfg.beta_start, cfg.beta_end, n).copy()
    elif cfg.beta_schedule == "scaled_linear":
        b = torch_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n)
        betas = b * b
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise ValueError(
            f"beta_schedule={cfg.beta_schedule!r} is not supported; "
            "use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
        )
    if getattr(cfg, "rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


# ---------------------------------------------------------------------------------------------
# sigma schedules (Euler, DPM-Solver)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t`` (elementwise, so it takes the whole array at once)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(in_sigmas, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(in_sigmas, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


# ---------------------------------------------------------------------------------------------
# array helpers: duck-typed over numpy / torch / cupy, never importing them


def log32(x):
    """float32 log as torch computes it on CPU (nearest float32 to the exact value, nearly always)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64)).astype(f32)[()]


def exp32(x):
    """float32 exp as torch computes it on CPU (see log32)."""
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(x, np.float64)).astype(f32)[()]


def _dtype_name(x) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]  # "float32" for numpy, cupy and torch alike


def as_float32(x):
    if _dtype_name(x) == "float32":
        return x
    return x.astype("float32") if hasattr(x, "astype") else x.float()


def cast_like(x, ref):
    if _dtype_name(x) == _dtype_name(ref):
        return x
    return x.astype(ref.dtype) if hasattr(x, "astype") else x.to(ref.dtype)


def coef_dtype(x):
    """diffusers' add_noise casts the schedule to the sample's dtype before the arithmetic."""
    return np.float16 if _dtype_name(x) == "float16" else f32


# ---------------------------------------------------------------------------------------------


def check_steps_args(num_inference_steps, timesteps, strength) -> None:
    if num_inference_steps is not None and timesteps is not None:
        raise ValueError("pass either num_inference_steps or timesteps, not both")
    if timesteps is None:
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required (an integer >= 1) unless timesteps is given")
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    elif len(timesteps) == 0:
        raise ValueError("timesteps must be a non-empty list")
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in the range (0, 1], got {strength!r}")


def img2img_start(n: int, strength: float) -> int:
    """``StableDiffusionImg2ImgPipeline.get_timesteps``: the index the denoising starts at."""
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    if t_start >= n:
        raise ValueError(
            f"strength={strength} with num_inference_steps={n} leaves zero denoising steps "
            f"(int(num_inference_steps * strength) == 0); raise strength or num_inference_steps"
        )
    return t_start


@dataclass(frozen=True)
class Scheduler:
    """Base of the runtime schedulers. Subclasses are frozen dataclasses whose fields are the
    ``__init__`` arguments of their diffusers twin, with the same defaults."""

    name: ClassVar[str] = "Scheduler"
    order: ClassVar[int] = 1
    step_kwargs: ClassVar[tuple[str, ...]] = ()  # keyword arguments step() accepts
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES
    unsupported: ClassVar[Mapping[str, Any]] = {}  # config key -> the only value implemented
    #: step/scale_model_input run on torch tensors as on numpy arrays, so the denoising loop may keep
    #: latents on the device; true of every scheduler here (bit-exact against numpy in
    #: tests/runtime/test_device_loop.py); a subclass whose step needs numpy sets it False
    device_loop: ClassVar[bool] = True

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "Scheduler":
        """Like diffusers' ``Scheduler.from_config``: keep the keys this class understands."""
        skip = set(config.get("_use_default_values", ()))
        merged = {k: v for k, v in config.items() if k not in skip}
        merged.update(overrides)
        keys = cls.config_keys()
        kwargs = {k: v for k, v in merged.items() if k in keys}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)

    def __post_init__(self):
        if self.prediction_type not in self.prediction_types:
            raise ValueError(
                f"{self.name}: prediction_type={self.prediction_type!r} is not supported; "
                f"use one of {', '.join(self.prediction_types)}"
            )
        for key, ok in self.unsupported.items():
            value = getattr(self, key, ok)
            if value != ok and not (ok is False and value is None):
                raise ValueError(
                    f"{self.name}: {key}={value!r} is not implemented by the latentrt runtime (only {ok!r})"
                )
        if self.trained_betas is None and self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            make_betas(self)  # raises the message
        self._validate()

    def _validate(self) -> None:
        pass

    def to_config(self) -> dict:
        cfg = {"_class_name": self.name}
        cfg.update({k: getattr(self, k) for k in self.config_keys()})
        if cfg.get("trained_betas") is not None:
            cfg["trained_betas"] = list(cfg["trained_betas"])
        return cfg

    # -- training schedule ----------------------------------------------------------------------

    @cached_property
    def betas(self) -> np.ndarray:
        return _readonly(make_betas(self))

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        return _readonly(torch_cumprod_f32(f32(1.0) - self.betas))

    @property
    def final_alpha_cumprod(self) -> np.float32:
        return f32(1.0) if getattr(self, "set_alpha_to_one", False) else self.alphas_cumprod[0]

    def _alpha_prev(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    # -- the public step API ----------------------------------------------------------------------

    def plan(self, num_inference_steps=None, *, timesteps=None, strength=1.0, original_inference_steps=None) -> Plan:
        raise NotImplementedError

    def init_state(self, plan: Plan):
        return None

    def scale_model_input(self, plan: Plan, i: int, sample):
        self._check_index(plan, i)
        return sample

    def noise_needed(self, plan: Plan, i: int, **step_kwargs) -> bool:
        self._check_index(plan, i)
        self._check_kwargs(step_kwargs)
        return False

    def step(self, plan: Plan, i: int, model_output, sample, state, noise=None, **step_kwargs) -> StepOutput:
        raise NotImplementedError

    def add_noise(self, plan: Plan, original_samples, noise, i: int = 0):
        """``scheduler.add_noise(x, noise, timesteps[i])`` for alpha-indexed (DDPM-style) schedules."""
        self._check_index(plan, i)
        ac = self.alphas_cumprod[int(plan.timesteps[i])].astype(coef_dtype(original_samples))
        return original_samples * float(np.sqrt(ac)) + noise * float(np.sqrt(ac.dtype.type(1) - ac))

    # -- helpers ----------------------------------------------------------------------------------

    def _check_index(self, plan: Plan, i: int) -> None:
        if not 0 <= i < len(plan):
            raise IndexError(f"step index {i} is out of range for a plan of {len(plan)} steps")

    def _check_kwargs(self, step_kwargs: Mapping[str, Any]) -> dict:
        # diffusers pipelines pass `eta` only to schedulers that take it ("ignored for others")
        unknown = [k for k in step_kwargs if k not in self.step_kwargs and k != "eta"]
        if unknown:
            accepted = ", ".join(self.step_kwargs) or "none"
            raise TypeError(f"{self.name}.step() got unexpected keyword arguments {unknown}; it accepts: {accepted}")
        return {k: v for k, v in step_kwargs.items() if k in self.step_kwargs}

    def _begin(self, plan: Plan, i: int, noise, needed: bool) -> None:
        self._check_index(plan, i)
        if needed and noise is None:
            raise ValueError(
                f"{self.name} draws noise at step {i}: pass noise=randn(model_output.shape) "
                "(check noise_needed(plan, i) before the step)"
            )


def spaced_timesteps(cfg, n: int, dtype) -> np.ndarray:
    """The DDPM-style ``timestep_spacing`` shared by DDIM, PNDM and the Euler family, descending.

    ``dtype`` float32 follows the Euler schedulers (float linspace), int64 DDIM's (rounded).
    """
    N = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        if np.dtype(dtype) == np.float32:
            return np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, N - 1, n).round()[::-1].copy().astype(dtype)
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (N // n)).round()[::-1].copy().astype(dtype)
        ts += cfg.steps_offset
        return ts
    if cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(N, 0, -(N / n))).astype(dtype)
        ts -= 1
        return ts
    raise ValueError(
        f"timestep_spacing={cfg.timestep_spacing!r} is not supported; use 'linspace', 'leading' or 'trailing'"
    )
