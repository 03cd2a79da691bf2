"""DDPMScheduler (unCLIP's prior sampler and image-embedding noiser) against diffusers' twin."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from latentrt.runtime.schedulers import DDPMScheduler, get_scheduler  # noqa: E402

TOL = 1e-5
SHAPE = (2, 32)

# stabilityai/stable-diffusion-2-1-unclip(-small): prior_scheduler and image_noising_scheduler
PRIOR = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
         "clip_sample_range": 5.0, "prediction_type": "sample", "variance_type": "fixed_small_log",
         "num_train_timesteps": 1000}
NOISING = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"}
CONFIGS = {
    "prior": PRIOR,
    "epsilon-linear": {"_class_name": "DDPMScheduler"},
    "v-scaled-fixed_large": {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                             "beta_end": 0.012, "prediction_type": "v_prediction", "variance_type": "fixed_large",
                             "clip_sample": False, "steps_offset": 1},
    "trailing": {**PRIOR, "timestep_spacing": "trailing"},
    "linspace": {**PRIOR, "timestep_spacing": "linspace", "variance_type": "fixed_small"},
}


def dummy_model(x, t):
    return x * 0.7 + 0.2 * math.cos(float(t) / 50.0)


def run_diffusers(cfg, n, seed, timesteps=None):
    sched = diffusers.DDPMScheduler.from_config(cfg)
    if timesteps is not None:
        sched.set_timesteps(timesteps=timesteps)
    else:
        sched.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    out = []
    for t in sched.timesteps:
        x = sched.step(dummy_model(x, t), t, x, generator=g, return_dict=False)[0]
        out.append(x.numpy().copy())
    return sched.timesteps.numpy(), out


def run_ours(cfg, n, seed, timesteps=None):
    sched = get_scheduler(cfg)
    plan = sched.plan(None if timesteps is not None else n, timesteps=timesteps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).numpy()
    out = []
    state = sched.init_state(plan)
    for i, t in enumerate(plan.timesteps):
        mo = dummy_model(x, t)
        noise = torch.randn(SHAPE, generator=g).numpy() if sched.noise_needed(plan, i) else None
        x, _, state = sched.step(plan, i, mo, x, state, noise=noise)
        out.append(x)
    return plan.timesteps, out


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 3, 25])
def test_full_loop_matches_diffusers(case, n):
    ts_ref, ref = run_diffusers(CONFIGS[case], n, seed=n)
    ts, ours = run_ours(CONFIGS[case], n, seed=n)
    assert ts.tolist() == ts_ref.tolist()
    for a, b in zip(ours, ref):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


def test_custom_timesteps():
    ts_ref, ref = run_diffusers(PRIOR, None, 3, timesteps=[900, 500, 20, 0])
    ts, ours = run_ours(PRIOR, None, 3, timesteps=[900, 500, 20, 0])
    assert ts.tolist() == ts_ref.tolist() == [900, 500, 20, 0]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("level", [0, 1, 100, 500, 999])
def test_add_noise_at_matches_diffusers(level):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 3
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ref = diffusers.DDPMScheduler.from_config(NOISING)
    want = ref.add_noise(x, noise, torch.tensor([level] * SHAPE[0]))
    got = get_scheduler(NOISING).add_noise_at(x.numpy(), noise.numpy(), level)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6, rtol=0)


def test_schedule_is_bit_exact():
    for cfg in CONFIGS.values():
        np.testing.assert_array_equal(get_scheduler(cfg).alphas_cumprod,
                                      diffusers.DDPMScheduler.from_config(cfg).alphas_cumprod.numpy())


def test_errors():
    with pytest.raises(ValueError, match="variance_type='learned'"):
        DDPMScheduler(variance_type="learned")
    sched = get_scheduler(NOISING)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 999\]"):
        sched.add_noise_at(np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32), 1000)
    with pytest.raises(ValueError, match="strictly descending"):
        sched.plan(timesteps=[10, 20])
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        sched.plan(1001)
    plan = sched.plan(2)
    with pytest.raises(ValueError, match="draws noise"):
        sched.step(plan, 0, np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32), None)
