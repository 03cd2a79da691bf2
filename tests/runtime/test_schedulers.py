"""Golden full loops: every runtime scheduler against its diffusers twin (dummy model, same noise)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from latentrt.runtime.schedulers import (  # noqa: E402
    SCHEDULERS,
    Plan,
    Scheduler,
    StepOutput,
    UnknownSchedulerError,
    get_scheduler,
)

SHAPE = (2, 4, 8, 8)
TOL = 1e-5
# Plus a float32-precision term for large samples: torch's vectorised float32 kernels (pow, sqrt) are
# not correctly rounded on every CPU (on an AMD EPYC, torch's x**0.5 differs from numpy's by 1 ulp),
# and over 25 steps such ulps grow to ~6 ulp of a sample of magnitude 20 (1.1e-5 absolute).
RTOL = 1e-6


def within_tol(ours, ref) -> tuple[bool, float]:
    err = float(np.abs(ours - ref).max())
    return err <= TOL + RTOL * float(np.abs(ref).max()), err

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD15_V = {**SD15, "prediction_type": "v_prediction"}
# SimianLuo/LCM_Dreamshaper_v7 scheduler config
LCM = {
    **SD15,
    "_class_name": "LCMScheduler",
    "clip_sample_range": 1.0,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
}


def dummy_model(x, t):
    """Deterministic stand-in for the UNet; identical float32 arithmetic for numpy and torch."""
    return x * 0.3 + 0.1 * math.sin(float(t) / 100.0)


def image_latents():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))


def run_diffusers(name, cfg, n, *, strength=1.0, timesteps=None, set_kw=None, step_kw=None, img2img=False):
    """What diffusers' pipelines do (StableDiffusion(Img2Img)Pipeline, LatentConsistencyModel*)."""
    sched = getattr(diffusers, name).from_config(cfg)
    set_kw = dict(set_kw or {})
    lcm = name == "LCMScheduler"
    if lcm and strength != 1.0:
        set_kw["strength"] = strength
    if timesteps is not None:
        sched.set_timesteps(timesteps=timesteps, **set_kw)
        n = len(timesteps)
    else:
        sched.set_timesteps(n, **set_kw)
    ts = sched.timesteps
    if img2img and not lcm:  # StableDiffusionImg2ImgPipeline.get_timesteps
        t_start = max(n - min(int(n * strength), n), 0)
        ts = ts[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
    g = torch.Generator().manual_seed(0)
    if img2img:
        noise = torch.randn(SHAPE, generator=g)
        sample = sched.add_noise(image_latents(), noise, ts[:1].repeat(SHAPE[0]))
    else:
        sample = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    step_kw = dict(step_kw or {})
    if "generator" in inspect.signature(sched.step).parameters:
        step_kw["generator"] = g
    steps = []
    for t in ts:
        model_output = dummy_model(sched.scale_model_input(sample, t), t)
        out = sched.step(model_output, t, sample, **step_kw)
        sample = out.prev_sample
        den = getattr(out, "denoised", None)
        den = getattr(out, "pred_original_sample", None) if den is None else den
        steps.append((sample.numpy().copy(), None if den is None else den.numpy().copy()))
    return ts.numpy(), sched, steps


def run_ours(name, cfg, n, *, strength=1.0, timesteps=None, plan_kw=None, step_kw=None, img2img=False, xp="numpy"):
    conv = (lambda a: a.numpy()) if xp == "numpy" else (lambda a: a)
    sched = get_scheduler(cfg, name)
    plan = sched.plan(n, timesteps=timesteps, strength=strength, **(plan_kw or {}))
    g = torch.Generator().manual_seed(0)
    if img2img:
        noise = conv(torch.randn(SHAPE, generator=g))
        sample = sched.add_noise(plan, conv(image_latents()), noise, 0)
    else:
        sample = conv(torch.randn(SHAPE, generator=g)) * plan.init_noise_sigma
    state = sched.init_state(plan)
    step_kw = step_kw or {}
    steps = []
    for i, t in enumerate(plan.timesteps):
        model_output = dummy_model(sched.scale_model_input(plan, i, sample), t)
        noise = None
        if sched.noise_needed(plan, i, **step_kw):
            noise = conv(torch.randn(model_output.shape, generator=g))
        out = sched.step(plan, i, model_output, sample, state, noise=noise, **step_kw)
        assert isinstance(out, StepOutput)
        sample, state = out.prev_sample, out.state
        steps.append((sample, out.denoised))
    return plan, sched, steps


def as_np(a):
    return a if isinstance(a, np.ndarray) else a.numpy()


def assert_loops_match(name, cfg, n=None, *, exact_timesteps=True, **kw):
    ref_ts, ref_sched, ref = run_diffusers(
        name, cfg, n, strength=kw.get("strength", 1.0), timesteps=kw.get("timesteps"),
        set_kw=kw.get("plan_kw"), step_kw=kw.get("step_kw"), img2img=kw.get("img2img", False),
    )
    plan, sched, ours = run_ours(name, cfg, n, **kw)
    assert plan.timesteps.dtype.kind == ref_ts.dtype.kind and plan.timesteps.dtype.itemsize == ref_ts.dtype.itemsize
    if exact_timesteps:
        np.testing.assert_array_equal(plan.timesteps, ref_ts)
    else:  # float timesteps derived from 1-ulp-sensitive sigmas (see test_euler_karras)
        np.testing.assert_allclose(plan.timesteps, ref_ts, rtol=1e-5, atol=1e-4)
    assert float(ref_sched.init_noise_sigma) == pytest.approx(plan.init_noise_sigma, rel=1e-6)
    assert len(ours) == len(ref)
    for i, ((x, d), (rx, rd)) in enumerate(zip(ours, ref)):
        assert as_np(x).dtype == np.float32
        ok, err = within_tol(as_np(x), rx)
        assert ok, f"{name}: step {i} prev_sample differs by {err}"
        if rd is not None and d is not None:
            ok, err = within_tol(as_np(d), rd)
            assert ok, f"{name}: step {i} denoised differs by {err}"
    return plan, ours, ref


# ------------------------------------------------------------------------------------------------
# LCM


def test_lcm_four_step_timesteps():
    plan = get_scheduler(LCM).plan(4)
    assert plan.timesteps.tolist() == [999, 759, 499, 259]
    assert plan.timesteps.dtype == np.int64 and len(plan) == 4 and plan.init_noise_sigma == 1.0


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("cfg", [LCM, SD15, SD15_V], ids=["lcm", "sd15", "sd15-v"])
def test_lcm_loop(cfg, n):
    plan, ours, ref = assert_loops_match("LCMScheduler", cfg, n)
    # the final output of an LCM loop is the last step's denoised sample
    np.testing.assert_allclose(ours[-1][1], ref[-1][1], atol=TOL, rtol=0)


@pytest.mark.parametrize("orig", [50, 30])
def test_lcm_original_inference_steps(orig):
    assert_loops_match("LCMScheduler", LCM, 4, plan_kw={"original_inference_steps": orig})


@pytest.mark.parametrize("timesteps", [[999, 759, 499, 259], [899, 699, 499, 299, 99], [999, 500]])
def test_lcm_custom_timesteps(timesteps):
    plan, _, _ = assert_loops_match("LCMScheduler", LCM, None, timesteps=timesteps)
    assert plan.timesteps.tolist() == timesteps


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_lcm_img2img(strength):
    # LatentConsistencyModelImg2ImgPipeline passes strength to set_timesteps (no get_timesteps cut)
    assert_loops_match("LCMScheduler", LCM, 4, strength=strength, img2img=True)


def test_lcm_img2img_custom_timesteps_cut():
    plan, _, _ = assert_loops_match("LCMScheduler", LCM, None, timesteps=[999, 759, 499, 259], strength=0.5, img2img=True)
    assert plan.timesteps.tolist() == [499, 259] and plan.num_inference_steps == 4


# ------------------------------------------------------------------------------------------------
# DDIM, PNDM


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("cfg", [SD15, SD15_V], ids=["eps", "v"])
@pytest.mark.parametrize("n", [10, 25])
def test_ddim_loop(cfg, eta, n):
    assert_loops_match("DDIMScheduler", cfg, n, step_kw={"eta": eta})


@pytest.mark.parametrize("extra", [{"clip_sample": True}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}])
def test_ddim_variants(extra):
    assert_loops_match("DDIMScheduler", {**SD15, **extra}, 12, step_kw={"eta": 0.5, "use_clipped_model_output": True})


@pytest.mark.parametrize("cfg", [SD15, SD15_V], ids=["eps", "v"])
@pytest.mark.parametrize("n", [1, 10, 25])
def test_pndm_loop(cfg, n):
    plan, _, _ = assert_loops_match("PNDMScheduler", cfg, n)
    assert len(plan) == (n + 1 if n > 1 else 1)  # PLMS repeats its second timestep


def test_pndm_runge_kutta_warmup():
    plan, _, _ = assert_loops_match("PNDMScheduler", {**SD15, "skip_prk_steps": False}, 10)
    assert len(plan) == 12 + 10 - 3


# ------------------------------------------------------------------------------------------------
# Euler, Euler ancestral


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("cfg", [SD15, SD15_V, {**SD15, "timestep_spacing": "leading"}], ids=["eps", "v", "leading"])
@pytest.mark.parametrize("n", [10, 25])
def test_euler_loop(name, cfg, n):
    plan, _, _ = assert_loops_match(name, cfg, n)
    assert plan.timesteps.dtype == np.float32


def test_euler_karras():
    # Karras timesteps are interpolated from log-sigmas; torch's (MKL) sqrt is not always
    # correctly rounded, so a float32 timestep may differ in its last bits from numpy's.
    assert_loops_match("EulerDiscreteScheduler", {**SD15, "use_karras_sigmas": True}, 15, exact_timesteps=False)


def test_euler_churn_draws_noise():
    kw = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0}
    plan, _, _ = assert_loops_match("EulerDiscreteScheduler", SD15, 10, step_kw=kw)
    sched = get_scheduler(SD15, "EulerDiscreteScheduler")
    needs = [sched.noise_needed(plan, i, **kw) for i in range(len(plan))]
    assert any(needs) and not all(needs)
    assert not any(sched.noise_needed(plan, i) for i in range(len(plan)))


@pytest.mark.parametrize(
    "extra",
    [
        {"prediction_type": "sample"},
        {"prediction_type": "v_prediction", "timestep_type": "continuous"},
        {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"},
        {"use_exponential_sigmas": True},
    ],
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()),
)
def test_euler_variants(extra):
    # float timesteps from log-sigmas (see test_euler_karras), and continuous ones (0.25 * log(sigma)):
    # torch's float32 log is not correctly rounded on every CPU (1 ulp off numpy's on an AMD EPYC)
    exact = "use_exponential_sigmas" not in extra and extra.get("timestep_type") != "continuous"
    assert_loops_match("EulerDiscreteScheduler", {**SD15, **extra}, 10, exact_timesteps=exact)


def test_zero_terminal_snr_ddim():
    # SD 2.1-v style: rescale_betas_zero_snr + trailing spacing + v-prediction
    cfg = {**SD15_V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert_loops_match("DDIMScheduler", cfg, 10)


def test_euler_custom_timesteps():
    assert_loops_match("EulerDiscreteScheduler", SD15, None, timesteps=[999, 800, 500, 250, 50])


# ------------------------------------------------------------------------------------------------
# DPM-Solver++


@pytest.mark.parametrize("karras", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("cfg", [SD15, SD15_V], ids=["eps", "v"])
@pytest.mark.parametrize("n", [10, 20])
def test_dpm_loop(cfg, karras, n):
    name = "DPMSolverMultistepScheduler+karras" if karras else "DPMSolverMultistepScheduler"
    ref_cfg = {**cfg, "use_karras_sigmas": karras}
    ref_ts, _, ref = run_diffusers("DPMSolverMultistepScheduler", ref_cfg, n)
    plan, sched, ours = run_ours(name, cfg, n)
    assert sched.use_karras_sigmas is karras
    np.testing.assert_array_equal(plan.timesteps, ref_ts)
    assert plan.timesteps.dtype == np.int64
    for (x, d), (rx, rd) in zip(ours, ref):
        assert np.abs(x - rx).max() <= TOL


@pytest.mark.parametrize(
    "extra",
    [
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
        {"final_sigmas_type": "sigma_min"},
        {"lower_order_final": False},
        {"solver_order": 3},
        {"solver_order": 1},
        {"solver_type": "heun"},
        {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
        {"timestep_spacing": "leading"},
        {"timestep_spacing": "trailing", "use_karras_sigmas": True},
        {"algorithm_type": "sde-dpmsolver++"},
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True},
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    ],
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()),
)
@pytest.mark.parametrize("n", [8, 16])
def test_dpm_variants(extra, n):
    assert_loops_match("DPMSolverMultistepScheduler", {**SD15, **extra}, n)


def test_dpm_custom_timesteps():
    assert_loops_match("DPMSolverMultistepScheduler", SD15, None, timesteps=[999, 750, 500, 250, 100])


# ------------------------------------------------------------------------------------------------
# image-to-image: plan + add_noise against StableDiffusionImg2ImgPipeline's conventions

NON_LCM = [
    ("DDIMScheduler", {}),
    ("PNDMScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("name,extra", NON_LCM, ids=[f"{n}{'+karras' if e else ''}" for n, e in NON_LCM])
def test_img2img(name, extra, strength):
    n = 10
    plan, ours, ref = assert_loops_match(name, {**SD15, **extra}, n, strength=strength, img2img=True)
    t_start = n - int(n * strength)
    assert plan.begin_index == t_start and plan.num_inference_steps == n
    assert len(plan) == len(plan.schedule_timesteps) - t_start


def test_img2img_add_noise_timestep():
    """add_noise at step i uses timesteps[i] (alpha schedules) or sigmas[begin_index + i]."""
    x, noise = image_latents().numpy(), np.ones(SHAPE, np.float32)
    for name in SCHEDULERS:
        sched = get_scheduler(SD15, name)
        plan = sched.plan(10, strength=0.6)
        ref = getattr(diffusers, name).from_config(SD15)
        ref.set_timesteps(10)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(plan.begin_index + 2)
        want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.tensor([plan.timesteps[2]] * 2))
        np.testing.assert_allclose(sched.add_noise(plan, x, noise, 2), want.numpy(), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# array libraries and dtypes


@pytest.mark.parametrize(
    "name,cfg,kw",
    [
        ("LCMScheduler", LCM, {}),
        ("DDIMScheduler", SD15, {"step_kw": {"eta": 1.0}}),
        ("PNDMScheduler", SD15, {}),
        ("EulerDiscreteScheduler", SD15_V, {}),
        ("EulerAncestralDiscreteScheduler", SD15, {}),
        ("DPMSolverMultistepScheduler", SD15, {}),
        ("DPMSolverMultistepScheduler", {**SD15, "algorithm_type": "sde-dpmsolver++"}, {"img2img": True, "strength": 0.5}),
    ],
)
def test_torch_tensors_give_the_same_numbers(name, cfg, kw):
    _, _, np_steps = run_ours(name, cfg, 6, **kw)
    _, _, pt_steps = run_ours(name, cfg, 6, xp="torch", **kw)
    for (x, _), (y, _) in zip(np_steps, pt_steps):
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
        np.testing.assert_allclose(y.numpy(), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("xp", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_float16_stays_float16(name, xp):
    sched = get_scheduler(SD15, name)
    plan = sched.plan(6, strength=0.9)
    rng = np.random.default_rng(0)

    def randn():
        a = rng.standard_normal(SHAPE).astype(np.float16)
        return a if xp == "numpy" else torch.from_numpy(a)

    state = sched.init_state(plan)
    x = sched.add_noise(plan, randn(), randn(), 0)
    f16 = np.float16 if xp == "numpy" else torch.float16
    assert x.dtype == f16
    for i, t in enumerate(plan.timesteps):
        mo = dummy_model(sched.scale_model_input(plan, i, x), t)
        assert mo.dtype == f16
        noise = randn() if sched.noise_needed(plan, i) else None
        x, _, state = sched.step(plan, i, mo, x, state, noise=noise)
        assert x.dtype == f16
    assert np.isfinite(as_np(x).astype(np.float32)).all()


def test_runtime_does_not_import_torch():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, latentrt.runtime.schedulers as s; "
        "s.get_scheduler({'_class_name': 'LCMScheduler'}).plan(4); "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


# ------------------------------------------------------------------------------------------------
# construction, overrides, immutability, errors


def test_registry():
    assert set(SCHEDULERS) == {
        "LCMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DDPMScheduler",  # unCLIP (issue 5); golden loops in tests/runtime/test_ddpm_scheduler.py
    }
    for name, cls in SCHEDULERS.items():
        assert cls.name == name and issubclass(cls, Scheduler)
        sched = get_scheduler(SD15, name)
        assert sched.name == name and sched.num_train_timesteps == 1000 and sched.prediction_type == "epsilon"


def test_training_schedule_is_bit_exact():
    for cfg in (SD15, {**SD15, "beta_schedule": "linear"}, {**SD15, "beta_schedule": "squaredcos_cap_v2"}):
        for name in SCHEDULERS:
            ref = getattr(diffusers, name).from_config(cfg)
            np.testing.assert_array_equal(get_scheduler(cfg, name).alphas_cumprod, ref.alphas_cumprod.numpy())


def test_override_keeps_config_keys():
    sched = get_scheduler(SD15, "EulerAncestralDiscreteScheduler")
    ref = diffusers.EulerAncestralDiscreteScheduler.from_config(SD15)
    for key in sched.config_keys():
        want = ref.config[key]
        assert getattr(sched, key) == (tuple(want) if isinstance(want, list) else want), key
    assert sched.beta_schedule == "scaled_linear" and sched.steps_offset == 1
    assert sched.timestep_spacing == "linspace"  # class default, as in diffusers
    assert not hasattr(sched, "skip_prk_steps")  # keys the class does not take are ignored

    lcm = get_scheduler(SD15, "LCMScheduler")
    assert lcm.set_alpha_to_one is False and lcm.original_inference_steps == 50
    assert get_scheduler(LCM).name == "LCMScheduler"
    assert get_scheduler({**SD15, "unknown_key": 3, "prediction_type": "v_prediction"}, "DDIMScheduler").prediction_type == "v_prediction"


def test_karras_alias_and_key():
    a = get_scheduler(SD15, "DPMSolverMultistepScheduler+karras")
    b = get_scheduler({**SD15, "use_karras_sigmas": True}, "DPMSolverMultistepScheduler")
    c = get_scheduler({**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
    assert a == b == c and a.use_karras_sigmas and a.name == "DPMSolverMultistepScheduler"
    assert not get_scheduler(SD15, "DPMSolverMultistepScheduler").use_karras_sigmas
    assert get_scheduler(SD15, "EulerDiscreteScheduler+karras").use_karras_sigmas


def test_unknown_scheduler_message():
    with pytest.raises(UnknownSchedulerError) as err:
        get_scheduler(SD15, "UniPCMultistepScheduler")
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "UniPCMultistepScheduler" in msg
    for name in SCHEDULERS:
        assert name in msg
    assert "DPMSolverMultistepScheduler+karras" in msg
    with pytest.raises(UnknownSchedulerError, match="_class_name"):
        get_scheduler({"beta_start": 0.1})


def test_immutable():
    sched = get_scheduler(LCM)
    plan = sched.plan(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_inference_steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.prediction_type = "sample"
    with pytest.raises(ValueError):
        plan.timesteps[0] = 5
    assert isinstance(plan, Plan) and sched.plan(4).timesteps.tolist() == plan.timesteps.tolist()


@pytest.mark.parametrize(
    "name,cfg,args,kwargs,match",
    [
        ("DDIMScheduler", SD15, (0,), {}, r"num_inference_steps must be an integer >= 1, got 0"),
        ("EulerDiscreteScheduler", SD15, (None,), {}, r"num_inference_steps is required"),
        ("DDIMScheduler", SD15, (2.5,), {}, r"num_inference_steps must be an integer >= 1"),
        ("DDIMScheduler", SD15, (1001,), {}, r"num_inference_steps must be in \[1, 1000\]"),
        ("LCMScheduler", LCM, (60,), {}, r"num_inference_steps must be in \[1, 50\] \(original_inference_steps\)"),
        ("LCMScheduler", LCM, (8,), {"original_inference_steps": 4}, r"num_inference_steps must be in \[1, 4\]"),
        ("LCMScheduler", LCM, (4,), {"original_inference_steps": 2000}, r"original_inference_steps must be .*\[1, 1000\]"),
        ("LCMScheduler", LCM, (4,), {"strength": 0.05}, r"strength=0.05 keeps int\(50 \* 0.05\) = 2"),
        ("LCMScheduler", LCM, (None,), {"timesteps": [259, 499]}, r"timesteps must be strictly descending"),
        ("LCMScheduler", LCM, (None,), {"timesteps": [1000, 499]}, r"timesteps must lie in \[0, 999\]"),
        ("LCMScheduler", LCM, (4,), {"timesteps": [999, 499]}, r"either num_inference_steps or timesteps"),
        ("DDIMScheduler", SD15, (4,), {"strength": 0.0}, r"strength must be in the range \(0, 1\], got 0.0"),
        ("EulerDiscreteScheduler", SD15, (4,), {"strength": 1.5}, r"strength must be in the range \(0, 1\], got 1.5"),
        ("DDIMScheduler", SD15, (2,), {"strength": 0.3}, r"leaves zero denoising steps"),
        ("DDIMScheduler", SD15, (None,), {"timesteps": [999, 500]}, r"DDIMScheduler does not take custom timesteps"),
        ("PNDMScheduler", SD15, (None,), {"timesteps": [999, 500]}, r"PNDMScheduler does not take custom timesteps"),
        ("EulerAncestralDiscreteScheduler", SD15, (None,), {"timesteps": [999]}, r"does not take custom timesteps"),
        ("DPMSolverMultistepScheduler+karras", SD15, (None,), {"timesteps": [999, 500]}, r"use_karras_sigmas"),
    ],
)
def test_bad_plan_arguments(name, cfg, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_scheduler(cfg, name).plan(*args, **kwargs)


def test_bad_config_and_step_arguments():
    with pytest.raises(ValueError, match="beta_schedule='cubic' is not supported"):
        get_scheduler({**SD15, "beta_schedule": "cubic"}, "DDIMScheduler")
    with pytest.raises(ValueError, match="prediction_type='flow' is not supported"):
        get_scheduler({**SD15, "prediction_type": "flow"}, "LCMScheduler")
    with pytest.raises(ValueError, match="thresholding=True is not implemented"):
        get_scheduler({**SD15, "thresholding": True}, "DDIMScheduler")
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver' is not implemented"):
        get_scheduler({**SD15, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "DPMSolverMultistepScheduler")

    sched = get_scheduler(LCM)
    plan = sched.plan(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="draws noise at step 0"):
        sched.step(plan, 0, x, x, None)
    with pytest.raises(IndexError, match="step index 4 is out of range"):
        sched.step(plan, 4, x, x, None)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['s_churn'\\]"):
        sched.step(plan, 3, x, x, None, s_churn=1.0)
    # eta is accepted and ignored by schedulers other than DDIM, as in diffusers' pipelines
    assert sched.step(plan, 3, x, x, None, eta=0.0).prev_sample.shape == SHAPE
    assert sched.noise_needed(plan, 0) and not sched.noise_needed(plan, 3)


def test_noise_needed_matches_diffusers_draws():
    """noise_needed is True exactly at the steps where diffusers' step() draws from the generator."""
    cases = [
        ("LCMScheduler", LCM, 4, {}),
        ("DDIMScheduler", SD15, 5, {"eta": 0.0}),
        ("DDIMScheduler", SD15, 5, {"eta": 0.3}),
        ("EulerDiscreteScheduler", SD15, 5, {}),
        ("EulerAncestralDiscreteScheduler", SD15, 5, {}),
        ("DPMSolverMultistepScheduler", SD15, 5, {}),
        ("DPMSolverMultistepScheduler", {**SD15, "algorithm_type": "sde-dpmsolver++"}, 5, {}),
    ]
    for name, cfg, n, kw in cases:
        ref = getattr(diffusers, name).from_config(cfg)
        ref.set_timesteps(n)
        g = torch.Generator().manual_seed(0)
        drew = []
        sample = torch.zeros(SHAPE)
        for t in ref.timesteps:
            before = g.get_state().clone()
            sample = ref.step(dummy_model(ref.scale_model_input(sample, t), t), t, sample, generator=g, **kw).prev_sample
            drew.append(not torch.equal(before, g.get_state()))
        sched = get_scheduler(cfg, name)
        plan = sched.plan(n)
        assert [sched.noise_needed(plan, i, **kw) for i in range(len(plan))] == drew, name
