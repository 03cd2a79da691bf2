"""Euler schedulers (k-diffusion style, sigma-indexed): ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler`` of diffusers, as pure functions.

Step ``i`` uses ``plan.sigmas[plan.begin_index + i]``: diffusers' internal step index starts at the
begin index the image-to-image pipeline sets (``set_begin_index(t_start)``), or at 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import (
    Plan,
    Scheduler,
    StepOutput,
    as_float32,
    cast_like,
    check_steps_args,
    coef_dtype,
    exponential_sigmas,
    f32,
    img2img_start,
    karras_sigmas,
    log32,
    sigma_to_t,
    spaced_timesteps,
)


class SigmaScheduler(Scheduler):
    """Shared by the Euler family (and the sigma side of DPM-Solver)."""

    @property
    def train_sigmas(self) -> np.ndarray:
        """((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, float32 (training order)."""
        ac = self.alphas_cumprod.copy()
        if getattr(self, "rescale_betas_zero_snr", False):
            ac[-1] = 2.0**-24  # as the sigma schedulers of diffusers do
        return np.sqrt((f32(1) - ac) / ac)

    def _check_custom_timesteps(self) -> None:
        """Custom timesteps fix the sigmas, so Karras / exponential spacing cannot also apply."""
        for flag in ("use_karras_sigmas", "use_exponential_sigmas"):
            if getattr(self, flag, False):
                raise ValueError(f"{self.name}: custom timesteps cannot be combined with {flag}=True")

    def _cut(self, n: int, full: np.ndarray, sigmas: np.ndarray, strength: float, init_noise_sigma: float) -> Plan:
        start = img2img_start(n, strength) * self.order
        return Plan(full[start:], n, init_noise_sigma, begin_index=start, schedule_timesteps=full, sigmas=sigmas)

    def _sigma(self, plan: Plan, i: int, offset: int = 0) -> np.float32:
        return plan.sigmas[plan.begin_index + i + offset]

    def scale_model_input(self, plan: Plan, i: int, sample):
        self._check_index(plan, i)
        sigma = self._sigma(plan, i)
        return sample / float(np.sqrt(sigma * sigma + f32(1)))

    def add_noise(self, plan: Plan, original_samples, noise, i: int = 0):
        self._check_index(plan, i)
        sigma = self._sigma(plan, i).astype(coef_dtype(original_samples))
        return original_samples + noise * float(sigma)

    def _init_noise_sigma(self, sigmas: np.ndarray) -> float:
        m = sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(m)
        return float(np.sqrt(m * m + f32(1)))

    def _x0(self, model_output, sample, sigma, sigma_hat):
        """pred_original_sample of the Euler schedulers (sample already float32)."""
        if self.prediction_type == "epsilon":
            return sample - model_output * float(sigma_hat)
        if self.prediction_type == "v_prediction":
            c_out = -sigma / np.sqrt(sigma * sigma + f32(1))
            return model_output * float(c_out) + sample / float(sigma * sigma + f32(1))
        return model_output  # "sample" / "original_sample"


@dataclass(frozen=True)
class EulerDiscreteScheduler(SigmaScheduler):
    name: ClassVar[str] = "EulerDiscreteScheduler"
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample", "original_sample")
    step_kwargs: ClassVar[tuple[str, ...]] = ("s_churn", "s_tmin", "s_tmax", "s_noise")
    unsupported: ClassVar[dict] = {"use_beta_sigmas": False, "interpolation_type": "linear"}

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def _validate(self) -> None:
        if bool(self.use_karras_sigmas) and bool(self.use_exponential_sigmas):
            raise ValueError(f"{self.name}: use only one of use_karras_sigmas and use_exponential_sigmas")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {self.final_sigmas_type!r}")
        if self.timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type must be 'discrete' or 'continuous', got {self.timestep_type!r}")

    @property
    def _continuous_v(self) -> bool:
        return self.timestep_type == "continuous" and self.prediction_type == "v_prediction"

    def plan(self, num_inference_steps=None, *, timesteps=None, strength=1.0, original_inference_steps=None) -> Plan:
        check_steps_args(num_inference_steps, timesteps, strength)
        if timesteps is not None:
            self._check_custom_timesteps()
            if self._continuous_v:
                raise ValueError(f"{self.name}: custom timesteps cannot be used with continuous v-prediction timesteps")
            ts = np.array(timesteps).astype(f32)
            n = len(ts)
        else:
            n = int(num_inference_steps)
            ts = spaced_timesteps(self, n, f32)
        train = self.train_sigmas
        log_sigmas = np.log(train)
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
        if self.use_karras_sigmas or self.use_exponential_sigmas:
            convert = karras_sigmas if self.use_karras_sigmas else exponential_sigmas
            sigmas = convert(sigmas, n, self.sigma_min, self.sigma_max)
            ts = sigma_to_t(sigmas, log_sigmas)
        if self.final_sigmas_type == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            last = np.sqrt((f32(1) - ac0) / ac0)
        else:
            last = 0
        sigmas = np.concatenate([sigmas, [last]]).astype(f32)
        if self._continuous_v:
            ts = (f32(0.25) * log32(sigmas[:-1])).astype(f32)
        else:
            ts = ts.astype(f32)
        return self._cut(n, ts, sigmas, strength, self._init_noise_sigma(sigmas))

    def _gamma(self, plan: Plan, i: int, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), **_) -> float:
        sigma = float(self._sigma(plan, i))
        return min(s_churn / (len(plan.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0

    def noise_needed(self, plan: Plan, i: int, **step_kwargs) -> bool:
        kw = self._check_kwargs(step_kwargs)
        self._check_index(plan, i)
        return self._gamma(plan, i, **kw) > 0

    def step(self, plan: Plan, i: int, model_output, sample, state, noise=None, **step_kwargs) -> StepOutput:
        kw = self._check_kwargs(step_kwargs)
        self._check_index(plan, i)
        gamma = self._gamma(plan, i, **kw)
        self._begin(plan, i, noise, gamma > 0)
        sample = as_float32(sample)
        sigma = self._sigma(plan, i)
        sigma_hat = sigma * f32(gamma + 1)
        if gamma > 0:
            eps = noise * kw.get("s_noise", 1.0)
            sample = sample + eps * float(np.sqrt(sigma_hat * sigma_hat - sigma * sigma))
        x0 = self._x0(model_output, sample, sigma, sigma_hat)
        derivative = (sample - x0) / float(sigma_hat)
        dt = self._sigma(plan, i, 1) - sigma_hat
        prev = cast_like(sample + derivative * float(dt), model_output)
        return StepOutput(prev, x0, None)


@dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(SigmaScheduler):
    name: ClassVar[str] = "EulerAncestralDiscreteScheduler"
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def plan(self, num_inference_steps=None, *, timesteps=None, strength=1.0, original_inference_steps=None) -> Plan:
        if timesteps is not None:
            raise ValueError(
                f"{self.name} does not take custom timesteps (its diffusers set_timesteps has no `timesteps` "
                "argument); pass num_inference_steps, or use EulerDiscreteScheduler"
            )
        check_steps_args(num_inference_steps, timesteps, strength)
        n = int(num_inference_steps)
        ts = spaced_timesteps(self, n, f32)
        train = self.train_sigmas
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(f32)
        return self._cut(n, ts, sigmas, strength, self._init_noise_sigma(sigmas))

    def noise_needed(self, plan: Plan, i: int, **step_kwargs) -> bool:
        super().noise_needed(plan, i, **step_kwargs)
        return True

    def step(self, plan: Plan, i: int, model_output, sample, state, noise=None, **step_kwargs) -> StepOutput:
        self._check_kwargs(step_kwargs)
        self._begin(plan, i, noise, True)
        sigma = self._sigma(plan, i)
        sample = as_float32(sample)
        x0 = self._x0(model_output, sample, sigma, sigma)
        s_from, s_to = sigma, self._sigma(plan, i, 1)
        sigma_up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        sigma_down = np.sqrt(s_to * s_to - sigma_up * sigma_up)
        derivative = (sample - x0) / float(sigma)
        prev = sample + derivative * float(sigma_down - sigma)
        prev = prev + noise * float(sigma_up)
        return StepOutput(cast_like(prev, model_output), x0, None)
