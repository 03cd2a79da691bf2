"""DPMSolverMultistepScheduler (DPM-Solver++ 1/2/3M, ODE or SDE) of diffusers as pure functions.

The multistep history (the last ``solver_order`` data predictions and how many lower-order steps
were taken) travels in an immutable :class:`DPMState`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from .base import (
    Plan,
    StepOutput,
    as_float32,
    cast_like,
    check_steps_args,
    coef_dtype,
    exp32,
    exponential_sigmas,
    f32,
    karras_sigmas,
    log32,
    sigma_to_t,
)
from .euler import SigmaScheduler


class DPMState(NamedTuple):
    model_outputs: tuple  # data predictions x0, oldest first; None where not filled yet
    lower_order_nums: int = 0


def alpha_sigma(sigma):
    """(alpha_t, sigma_t) of a float32 sigma (``_sigma_to_alpha_sigma_t``)."""
    alpha_t = f32(1) / np.sqrt(sigma * sigma + f32(1))
    return alpha_t, sigma * alpha_t


def lam(alpha_t, sigma_t):
    return log32(alpha_t) - log32(sigma_t)  # +inf at sigma 0


@dataclass(frozen=True)
class DPMSolverMultistepScheduler(SigmaScheduler):
    name: ClassVar[str] = "DPMSolverMultistepScheduler"
    unsupported: ClassVar[dict] = {
        "thresholding": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
    }

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def _validate(self) -> None:
        # diffusers reads variance_type only for "learned" / "learned_range" model outputs; any other
        # value (a DDPM file's "fixed_small" carried over by from_config) runs as None does
        if self.variance_type in ("learned", "learned_range"):
            raise ValueError(f"{self.name}: variance_type={self.variance_type!r} is not implemented by the "
                             "latentrt runtime (only model outputs without a variance channel)")
        if self.algorithm_type == "deis":  # diffusers maps these onto its defaults
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(
                f"{self.name}: algorithm_type={self.algorithm_type!r} is not implemented by the latentrt runtime "
                "(use 'dpmsolver++' or 'sde-dpmsolver++'; 'dpmsolver' and 'sde-dpmsolver' are deprecated in diffusers)"
            )
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"{self.name}: solver_type must be 'midpoint' or 'heun', got {self.solver_type!r}")
        if self.solver_order not in (1, 2, 3):
            raise ValueError(f"{self.name}: solver_order must be 1, 2 or 3, got {self.solver_order!r}")
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError(f"{self.name}: use only one of use_karras_sigmas and use_exponential_sigmas")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {self.final_sigmas_type!r}")

    # -- plan -------------------------------------------------------------------------------------

    def _spaced(self, n: int) -> np.ndarray:
        N = self.num_train_timesteps
        ac = self.alphas_cumprod
        lambda_t = lam(np.sqrt(ac), np.sqrt(f32(1) - ac))
        last = N - int(np.searchsorted(np.flip(lambda_t), self.lambda_min_clipped))
        if self.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            return ts + self.steps_offset
        if self.timestep_spacing == "trailing":
            return np.arange(last, 0, -(N / n)).round().copy().astype(np.int64) - 1
        raise ValueError(
            f"timestep_spacing={self.timestep_spacing!r} is not supported; use 'linspace', 'leading' or 'trailing'"
        )

    def plan(self, num_inference_steps=None, *, timesteps=None, strength=1.0, original_inference_steps=None) -> Plan:
        check_steps_args(num_inference_steps, timesteps, strength)
        if timesteps is not None:
            self._check_custom_timesteps()
            ts = np.array(timesteps).astype(np.int64)
            n = len(ts)
        else:
            n = int(num_inference_steps)
            ts = self._spaced(n)
        train = self.train_sigmas
        log_sigmas = np.log(train)
        if self.use_karras_sigmas or self.use_exponential_sigmas:
            convert = karras_sigmas if self.use_karras_sigmas else exponential_sigmas
            sigmas = convert(np.flip(train).copy(), n)
            ts = sigma_to_t(sigmas, log_sigmas)
            if self.use_karras_sigmas and self.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(train)), train)
        if self.final_sigmas_type == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            last = np.sqrt((f32(1) - ac0) / ac0)
        else:
            last = 0
        sigmas = np.concatenate([sigmas, [last]]).astype(f32)
        return self._cut(n, ts.astype(np.int64), sigmas, strength, 1.0)

    # -- step -------------------------------------------------------------------------------------

    def scale_model_input(self, plan: Plan, i: int, sample):
        self._check_index(plan, i)
        return sample

    def add_noise(self, plan: Plan, original_samples, noise, i: int = 0):
        self._check_index(plan, i)
        alpha_t, sigma_t = alpha_sigma(self._sigma(plan, i).astype(coef_dtype(original_samples)))
        return original_samples * float(alpha_t) + noise * float(sigma_t)

    def init_state(self, plan: Plan) -> DPMState:
        return DPMState((None,) * self.solver_order, 0)

    @property
    def _sde(self) -> bool:
        return self.algorithm_type == "sde-dpmsolver++"

    def noise_needed(self, plan: Plan, i: int, **step_kwargs) -> bool:
        super().noise_needed(plan, i, **step_kwargs)
        return self._sde

    def step(self, plan: Plan, i: int, model_output, sample, state, noise=None, **step_kwargs) -> StepOutput:
        self._check_kwargs(step_kwargs)
        self._begin(plan, i, noise, self._sde)
        state = state if state is not None else self.init_state(plan)
        idx, n_all = plan.begin_index + i, len(plan.schedule_timesteps)
        short = self.lower_order_final and n_all < 15
        lower_final = idx == n_all - 1 and (self.euler_at_final or short or self.final_sigmas_type == "zero")
        lower_second = idx == n_all - 2 and short

        x0 = self._data_prediction(plan, i, model_output, sample)
        outs = state.model_outputs[1:] + (x0,)
        sample = as_float32(sample)
        if self.solver_order == 1 or state.lower_order_nums < 1 or lower_final:
            order = 1
        elif self.solver_order == 2 or state.lower_order_nums < 2 or lower_second:
            order = 2
        else:
            order = 3
        prev = self._update(plan, idx, order, outs, sample, noise)
        new_state = DPMState(outs, min(state.lower_order_nums + 1, self.solver_order))
        return StepOutput(cast_like(prev, x0), x0, new_state)

    def _data_prediction(self, plan: Plan, i: int, model_output, sample):
        """``convert_model_output`` for the ++ algorithms: the model's x0."""
        if self.prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = alpha_sigma(self._sigma(plan, i))
        if self.prediction_type == "epsilon":
            return (sample - model_output * float(sigma_t)) / float(alpha_t)
        return sample * float(alpha_t) - model_output * float(sigma_t)  # v_prediction

    def _update(self, plan: Plan, idx: int, order: int, outs: tuple, sample, noise):
        """First/second/third order DPM-Solver++ updates (multistep_dpm_solver_*_order_update)."""
        sig = plan.sigmas
        alpha_t, sigma_t = alpha_sigma(sig[idx + 1])
        alpha_s0, sigma_s0 = alpha_sigma(sig[idx])
        lambda_t, lambda_s0 = lam(alpha_t, sigma_t), lam(alpha_s0, sigma_s0)
        h = lambda_t - lambda_s0
        m0 = outs[-1]
        sde = self._sde
        em1 = exp32(-h) - f32(1.0)  # exp(-h) - 1
        e2 = f32(1) - exp32(f32(-2.0) * h)  # 1 - exp(-2h)
        if sde:  # x = c_x * sample + c0 * D0 (+ ...) + noise_term
            c_x = float(sigma_t / sigma_s0 * exp32(-h))
            c0 = alpha_t * e2
            noise_term = noise * float(sigma_t * np.sqrt(e2))
        else:  # x = c_x * sample - c0 * D0 (- ...)
            c_x = float(sigma_t / sigma_s0)
            c0 = alpha_t * em1

        if order == 1:
            if sde:
                return sample * c_x + m0 * float(c0) + noise_term
            return sample * c_x - m0 * float(c0)

        m1 = outs[-2]
        alpha_s1, sigma_s1 = alpha_sigma(sig[idx - 1])
        lambda_s1 = lam(alpha_s1, sigma_s1)
        h_0 = lambda_s0 - lambda_s1
        r0 = h_0 / h
        if order == 2:
            d1 = (m0 - m1) * float(f32(1.0) / r0)
            if not sde:
                x = sample * c_x - m0 * float(c0)
                if self.solver_type == "midpoint":
                    return x - d1 * float(f32(0.5) * c0)
                return x + d1 * float(alpha_t * (em1 / h + f32(1.0)))
            x = sample * c_x + m0 * float(c0)
            if self.solver_type == "midpoint":
                x = x + d1 * float(f32(0.5) * c0)
            else:
                x = x + d1 * float(alpha_t * (e2 / (f32(-2.0) * h) + f32(1.0)))
            return x + noise_term

        m2 = outs[-3]
        alpha_s2, sigma_s2 = alpha_sigma(sig[idx - 2])
        h_1 = lambda_s1 - lam(alpha_s2, sigma_s2)
        r1 = h_1 / h
        d1_0 = (m0 - m1) * float(f32(1.0) / r0)
        d1_1 = (m1 - m2) * float(f32(1.0) / r1)
        d1 = d1_0 + (d1_0 - d1_1) * float(r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) * float(f32(1.0) / (r0 + r1))
        if not sde:
            x = sample * c_x - m0 * float(c0)
            x = x + d1 * float(alpha_t * (em1 / h + f32(1.0)))
            return x - d2 * float(alpha_t * ((em1 + h) / (h * h) - f32(0.5)))
        x = sample * c_x + m0 * float(c0)
        x = x + d1 * float(alpha_t * (e2 / (f32(-2.0) * h) + f32(1.0)))
        two_h = f32(2.0) * h
        x = x + d2 * float(alpha_t * ((e2 - two_h) / (two_h * two_h) - f32(0.5)))
        return x + noise_term
