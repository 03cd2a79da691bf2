"""PNDMScheduler: diffusers' ``PNDMScheduler`` (PLMS, optionally with Runge-Kutta warm-up) as pure functions.

diffusers keeps a step counter and a list of past model outputs (``ets``); here they travel in an
immutable :class:`PNDMState`. The counter starts at 0 on the first step of the plan, as it does in
diffusers after ``set_timesteps`` (also when image-to-image cuts the schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .base import Plan, Scheduler, StepOutput, check_steps_args, f32, img2img_start, spaced_timesteps
from .ddim import check_max_steps, no_custom_timesteps


class PNDMState(NamedTuple):
    counter: int = 0
    ets: tuple = ()  # past model outputs, newest last
    cur_sample: Any = None
    cur_model_output: Any = None  # Runge-Kutta accumulator (None = 0)


@dataclass(frozen=True)
class PNDMScheduler(Scheduler):
    name: ClassVar[str] = "PNDMScheduler"
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    pndm_order: ClassVar[int] = 4

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def _schedules(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(prk_timesteps, plms_timesteps) as diffusers' set_timesteps builds them."""
        ts = spaced_timesteps(self, n, np.int64)[::-1]  # ascending, as diffusers' `_timesteps`
        if self.skip_prk_steps:
            prk = np.array([], np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            prk = np.array(ts[-self.pndm_order :]).repeat(2) + np.tile(
                np.array([0, self.num_train_timesteps // n // 2]), self.pndm_order
            )
            prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = ts[:-3][::-1].copy()
        return prk.astype(np.int64), plms.astype(np.int64)

    def plan(self, num_inference_steps=None, *, timesteps=None, strength=1.0, original_inference_steps=None) -> Plan:
        no_custom_timesteps(self.name, timesteps)
        check_steps_args(num_inference_steps, timesteps, strength)
        n = int(num_inference_steps)
        check_max_steps(self, n)
        if not self.skip_prk_steps and n < self.pndm_order:
            raise ValueError(
                f"PNDMScheduler with skip_prk_steps=False needs num_inference_steps >= {self.pndm_order}, got {n}"
            )
        full = np.concatenate(self._schedules(n))
        start = img2img_start(n, strength) * self.order
        return Plan(full[start:], n, 1.0, begin_index=start, schedule_timesteps=full)

    def init_state(self, plan: Plan) -> PNDMState:
        return PNDMState()

    def step(self, plan: Plan, i: int, model_output, sample, state, noise=None, **step_kwargs) -> StepOutput:
        self._check_kwargs(step_kwargs)
        self._begin(plan, i, noise, False)
        state = state if state is not None else PNDMState()
        t = int(plan.timesteps[i])
        n = plan.num_inference_steps
        prk, _ = self._schedules(n)
        if state.counter < len(prk) and not self.skip_prk_steps:
            return self._step_prk(prk, n, t, model_output, sample, state)
        return self._step_plms(n, t, model_output, sample, state)

    def _step_prk(self, prk, n, t, mo, sample, st: PNDMState) -> StepOutput:
        c = st.counter
        prev_t = t - (0 if c % 2 else self.num_train_timesteps // n // 2)
        t = int(prk[c // 4 * 4])
        ets, cur_sample, acc = st.ets, st.cur_sample, st.cur_model_output
        if c % 4 == 0:
            acc = mo * (1 / 6) if acc is None else acc + mo * (1 / 6)
            ets, cur_sample = ets + (mo,), sample
        elif c % 4 in (1, 2):
            acc = mo * (1 / 3) if acc is None else acc + mo * (1 / 3)
        else:
            mo = mo * (1 / 6) if acc is None else acc + mo * (1 / 6)
            acc = None
        x = cur_sample if cur_sample is not None else sample
        prev = self._prev_sample(x, t, prev_t, mo)
        return StepOutput(prev, None, PNDMState(c + 1, ets, cur_sample, acc))

    def _step_plms(self, n, t, mo, sample, st: PNDMState) -> StepOutput:
        if not self.skip_prk_steps and len(st.ets) < 3:
            raise ValueError("PNDMScheduler: PLMS steps need the 12 Runge-Kutta warm-up steps first")
        c, ets, cur_sample = st.counter, st.ets, st.cur_sample
        ratio = self.num_train_timesteps // n
        prev_t = t - ratio
        if c != 1:
            ets = ets[-3:] + (mo,)
        else:
            prev_t, t = t, t + ratio
        if len(ets) == 1 and c == 0:
            cur_sample = sample
        elif len(ets) == 1 and c == 1:
            mo = (mo + ets[-1]) / 2
            sample, cur_sample = cur_sample, None
        elif len(ets) == 2:
            mo = (ets[-1] * 3 - ets[-2]) / 2
        elif len(ets) == 3:
            mo = (ets[-1] * 23 - ets[-2] * 16 + ets[-3] * 5) / 12
        else:
            mo = (ets[-1] * 55 - ets[-2] * 59 + ets[-3] * 37 - ets[-4] * 9) * (1 / 24)
        prev = self._prev_sample(sample, t, prev_t, mo)
        return StepOutput(prev, None, PNDMState(c + 1, ets, cur_sample, st.cur_model_output))

    def _prev_sample(self, sample, t: int, prev_t: int, mo):
        a_t, a_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        b_t, b_prev = f32(1) - a_t, f32(1) - a_prev
        if self.prediction_type == "v_prediction":
            mo = mo * float(np.sqrt(a_t)) + sample * float(np.sqrt(b_t))
        sample_coeff = np.sqrt(a_prev / a_t)
        denom = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        return sample * float(sample_coeff) - (mo * float(a_prev - a_t)) / float(denom)
