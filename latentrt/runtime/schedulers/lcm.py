"""LCMScheduler (latent consistency models): diffusers' ``LCMScheduler`` as pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Plan, Scheduler, StepOutput, check_steps_args, f32, img2img_start, logger


@dataclass(frozen=True)
class LCMScheduler(Scheduler):
    name: ClassVar[str] = "LCMScheduler"
    unsupported: ClassVar[dict] = {"thresholding": False}

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple | None = None
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False

    def plan(self, num_inference_steps=None, *, timesteps=None, strength=1.0, original_inference_steps=None) -> Plan:
        check_steps_args(num_inference_steps, timesteps, strength)
        N = self.num_train_timesteps
        orig = self.original_inference_steps if original_inference_steps is None else original_inference_steps
        if isinstance(orig, bool) or not isinstance(orig, (int, np.integer)) or not 1 <= orig <= N:
            raise ValueError(
                f"original_inference_steps must be an integer in [1, {N}] (num_train_timesteps), got {orig!r}"
            )
        k = N // orig
        origin = np.asarray(list(range(1, int(orig * strength) + 1)), dtype=np.int64) * k - 1

        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(ts, ts[1:])):
                raise ValueError(f"timesteps must be strictly descending, got {ts}")
            if not 0 <= ts[-1] <= ts[0] < N:
                raise ValueError(f"timesteps must lie in [0, {N - 1}] (num_train_timesteps - 1), got {ts}")
            off = sorted(set(ts[1:]) - set(origin.tolist()), reverse=True)
            if off:
                logger.warning("custom LCM timesteps %s are not on the distillation schedule", off)
            n = len(ts)
            ts = np.array(ts, np.int64)[img2img_start(n, strength) * self.order :]
        else:
            n = int(num_inference_steps)
            if n > orig:
                raise ValueError(
                    f"num_inference_steps must be in [1, {orig}] (original_inference_steps), got {n}: LCM picks "
                    "its steps from the original_inference_steps-long distillation schedule"
                )
            if len(origin) < n:
                raise ValueError(
                    f"strength={strength} keeps int({orig} * {strength}) = {len(origin)} of the "
                    f"original_inference_steps, fewer than num_inference_steps={n}; raise strength to at least "
                    f"{n / orig} or lower num_inference_steps to at most {len(origin)}"
                )
            origin = origin[::-1].copy()
            idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
            ts = origin[idx]
        return Plan(timesteps=ts, num_inference_steps=n, init_noise_sigma=1.0)

    def noise_needed(self, plan: Plan, i: int, **step_kwargs) -> bool:
        super().noise_needed(plan, i, **step_kwargs)
        # diffusers: `step_index != num_inference_steps - 1` (with a cut custom schedule: every step).
        # step_index counts from the begin index that StableDiffusionImg2ImgPipeline sets after its
        # strength cut (plan.begin_index; 0 for the LCM pipelines' own plans).
        return plan.begin_index + i != plan.num_inference_steps - 1

    def boundary_condition(self, t: int) -> tuple[np.float32, np.float32]:
        """c_skip, c_out (float32, as diffusers gets them from an int64 timestep tensor)."""
        s = f32(t) * f32(self.timestep_scaling)
        sd2 = f32(0.25)  # sigma_data ** 2
        return sd2 / (s * s + sd2), s / np.sqrt(s * s + sd2)

    def step(self, plan: Plan, i: int, model_output, sample, state, noise=None, **step_kwargs) -> StepOutput:
        self._check_kwargs(step_kwargs)
        needed = self.noise_needed(plan, i)
        self._begin(plan, i, noise, needed)
        t = int(plan.timesteps[i])
        prev_t = int(plan.timesteps[i + 1]) if i + 1 < len(plan) else t
        a_t, a_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        b_t, b_prev = f32(1) - a_t, f32(1) - a_prev
        c_skip, c_out = self.boundary_condition(t)

        if self.prediction_type == "epsilon":
            x0 = (sample - model_output * float(np.sqrt(b_t))) / float(np.sqrt(a_t))
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = sample * float(np.sqrt(a_t)) - model_output * float(np.sqrt(b_t))
        if self.clip_sample:
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)

        denoised = x0 * float(c_out) + sample * float(c_skip)
        if needed:
            prev = denoised * float(np.sqrt(a_prev)) + noise * float(np.sqrt(b_prev))
        else:
            prev = denoised
        return StepOutput(prev, denoised, None)
