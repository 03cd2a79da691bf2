"""DDIMScheduler: diffusers' ``DDIMScheduler`` as pure functions (``eta`` > 0 draws noise)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Plan, Scheduler, StepOutput, check_steps_args, f32, img2img_start, spaced_timesteps


def no_custom_timesteps(name: str, timesteps) -> None:
    if timesteps is not None:
        raise ValueError(
            f"{name} does not take custom timesteps (its diffusers set_timesteps has no `timesteps` "
            "argument); pass num_inference_steps, or use LCMScheduler, EulerDiscreteScheduler or "
            "DPMSolverMultistepScheduler"
        )


def check_max_steps(sched, n: int) -> None:
    if n > sched.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {sched.num_train_timesteps}] (num_train_timesteps), got {n}"
        )


@dataclass(frozen=True)
class DDIMScheduler(Scheduler):
    name: ClassVar[str] = "DDIMScheduler"
    step_kwargs: ClassVar[tuple[str, ...]] = ("eta", "use_clipped_model_output")
    unsupported: ClassVar[dict] = {"thresholding": False}

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def plan(self, num_inference_steps=None, *, timesteps=None, strength=1.0, original_inference_steps=None) -> Plan:
        no_custom_timesteps(self.name, timesteps)
        check_steps_args(num_inference_steps, timesteps, strength)
        n = int(num_inference_steps)
        check_max_steps(self, n)
        full = spaced_timesteps(self, n, np.int64)
        start = img2img_start(n, strength) * self.order
        return Plan(full[start:], n, 1.0, begin_index=start, schedule_timesteps=full)

    def noise_needed(self, plan: Plan, i: int, **step_kwargs) -> bool:
        super().noise_needed(plan, i, **step_kwargs)
        return step_kwargs.get("eta", 0.0) > 0

    def step(self, plan: Plan, i: int, model_output, sample, state, noise=None, **step_kwargs) -> StepOutput:
        kw = self._check_kwargs(step_kwargs)
        eta = kw.get("eta", 0.0)
        self._begin(plan, i, noise, eta > 0)
        t = int(plan.timesteps[i])
        prev_t = t - self.num_train_timesteps // plan.num_inference_steps
        a_t, a_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        b_t = f32(1) - a_t
        sa, sb = float(np.sqrt(a_t)), float(np.sqrt(b_t))

        if self.prediction_type == "epsilon":
            x0 = (sample - model_output * sb) / sa
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - x0 * sa) / sb
        else:  # v_prediction
            x0 = sample * sa - model_output * sb
            eps = model_output * sa + sample * sb
        if self.clip_sample:
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)

        variance = ((f32(1) - a_prev) / b_t) * (f32(1) - a_t / a_prev)
        std = f32(eta) * np.sqrt(variance)
        if kw.get("use_clipped_model_output", False):
            eps = (sample - x0 * sa) / sb
        direction = eps * float(np.sqrt(f32(1) - a_prev - std * std))
        prev = x0 * float(np.sqrt(a_prev)) + direction
        if eta > 0:
            prev = prev + noise * float(std)
        return StepOutput(prev, x0, None)
