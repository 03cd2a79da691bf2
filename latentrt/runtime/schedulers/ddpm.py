"""DDPMScheduler: diffusers' ``DDPMScheduler`` as pure functions.

unCLIP uses it twice: as the prior's sampler (``prediction_type="sample"``, ``clip_sample`` with a
wide range, ``variance_type="fixed_small_log"``) and, through :meth:`DDPMScheduler.add_noise_at`, as
the image-embedding noiser of ``noise_image_embeddings`` (a ``noise_level`` is a training timestep,
not a step of a plan). Every step but the last draws variance noise, as diffusers' step does with
the pipeline's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Plan, Scheduler, StepOutput, check_steps_args, coef_dtype, exp32, f32, img2img_start, log32
from .base import spaced_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class DDPMScheduler(Scheduler):
    name: ClassVar[str] = "DDPMScheduler"
    unsupported: ClassVar[dict] = {"thresholding": False}

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def _validate(self) -> None:
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"DDPMScheduler: variance_type={self.variance_type!r} is not implemented by the latentrt runtime; "
                f"use one of {', '.join(VARIANCE_TYPES)} (learned variances need the model's variance channels)"
            )

    def plan(self, num_inference_steps=None, *, timesteps=None, strength=1.0, original_inference_steps=None) -> Plan:
        check_steps_args(num_inference_steps, timesteps, strength)
        N = self.num_train_timesteps
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(ts, ts[1:])):
                raise ValueError(f"timesteps must be strictly descending, got {ts}")
            if ts[0] >= N or ts[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {N - 1}] (num_train_timesteps - 1), got {ts}")
            full, n = np.array(ts, np.int64), len(ts)
        else:
            n = int(num_inference_steps)
            if n > N:
                raise ValueError(f"num_inference_steps must be in [1, {N}] (num_train_timesteps), got {n}")
            full = spaced_timesteps(self, n, np.int64)
        start = img2img_start(n, strength)
        return Plan(full[start:], n, 1.0, begin_index=start, schedule_timesteps=full)

    def _prev_t(self, plan: Plan, i: int) -> int:
        """diffusers' ``previous_timestep`` once timesteps are set: the next one of the full schedule."""
        j = plan.begin_index + i + 1
        return int(plan.schedule_timesteps[j]) if j < len(plan.schedule_timesteps) else -1

    def noise_needed(self, plan: Plan, i: int, **step_kwargs) -> bool:
        super().noise_needed(plan, i, **step_kwargs)
        return int(plan.timesteps[i]) > 0

    def std(self, t: int, prev_t: int) -> np.float32:
        """The standard deviation of the noise added at timestep ``t`` (``_get_variance`` in diffusers)."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else f32(1)
        beta_t = f32(1) - a_t / a_prev
        variance = max((f32(1) - a_prev) / (f32(1) - a_t) * beta_t, f32(1e-20))
        if self.variance_type == "fixed_small":
            return np.sqrt(variance)
        if self.variance_type == "fixed_small_log":
            return exp32(f32(0.5) * log32(variance))
        return np.sqrt(beta_t)  # fixed_large

    def step(self, plan: Plan, i: int, model_output, sample, state, noise=None, **step_kwargs) -> StepOutput:
        self._check_kwargs(step_kwargs)
        t = int(plan.timesteps[i])
        self._begin(plan, i, noise, t > 0)
        prev_t = self._prev_t(plan, i)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else f32(1)
        b_t, b_prev = f32(1) - a_t, f32(1) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = f32(1) - cur_alpha

        if self.prediction_type == "epsilon":
            x0 = (sample - model_output * float(np.sqrt(b_t))) / float(np.sqrt(a_t))
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = sample * float(np.sqrt(a_t)) - model_output * float(np.sqrt(b_t))
        if self.clip_sample:
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)

        x0_coef = (np.sqrt(a_prev) * cur_beta) / b_t
        sample_coef = np.sqrt(cur_alpha) * b_prev / b_t
        prev = x0 * float(x0_coef) + sample * float(sample_coef)
        if t > 0:
            prev = prev + noise * float(self.std(t, prev_t))
        return StepOutput(prev, x0, None)

    def add_noise_at(self, original_samples, noise, timestep: int):
        """``add_noise(x, noise, timestep)`` at a training timestep (unCLIP's ``noise_level``)."""
        t = int(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.num_train_timesteps - 1}] "
                             f"(num_train_timesteps - 1), got {t}")
        ac = self.alphas_cumprod[t].astype(coef_dtype(original_samples))
        return original_samples * float(np.sqrt(ac)) + noise * float(np.sqrt(ac.dtype.type(1) - ac))
