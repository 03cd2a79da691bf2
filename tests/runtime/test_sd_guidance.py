"""The pieces of the SD loop against diffusers, without models: guidance arithmetic, and the schedule
an SD image-to-image pipeline iterates (including an LCM scheduler, i.e. LCM-LoRA)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from latentrt.runtime.pipelines.guidance import apply_guidance, negative_prompt_list, rescale_noise_cfg, sd_plan  # noqa: E402
from latentrt.runtime.schedulers import get_scheduler  # noqa: E402

SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None}


def test_guidance_and_rescale_match_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as ref_rescale

    g = torch.Generator().manual_seed(0)
    pred = torch.randn((4, 4, 8, 12), generator=g)
    uncond, text = pred.chunk(2)
    want = uncond + 7.5 * (text - uncond)
    np.testing.assert_allclose(apply_guidance(pred.numpy(), 7.5), want.numpy(), atol=1e-6, rtol=0)
    want_r = ref_rescale(want, text, guidance_rescale=0.7)
    np.testing.assert_allclose(rescale_noise_cfg(want.numpy(), text.numpy(), 0.7), want_r.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(apply_guidance(pred.numpy(), 7.5, 0.7), want_r.numpy(), atol=1e-6, rtol=0)


def test_negative_prompt_list():
    assert negative_prompt_list(None, 2) == ["", ""]
    assert negative_prompt_list("x", 2) == ["x", "x"]
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but there are 2 prompts"):
        negative_prompt_list(["x"], 2)


def _dummy(x, t):
    return x * 0.3 + 0.1 * math.sin(float(t) / 100.0)


@pytest.mark.parametrize("name", ["LCMScheduler", "EulerAncestralDiscreteScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("strength", [0.5, 0.75, 1.0])
def test_sd_img2img_loop_matches_diffusers(name, strength):
    """StableDiffusionImg2ImgPipeline: set_timesteps(n), cut at int(n * strength), set_begin_index.

    Regression: an LCM schedule cut this way must not draw noise at its last step (diffusers counts
    the step index from the begin index), which the LCM scheduler's noise_needed missed."""
    n, shape = 4, (1, 4, 8, 8)
    sched = getattr(diffusers, name).from_config(SD15)
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(0)
    t_start = max(n - min(int(n * strength), n), 0)
    ts = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    step_kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
    init = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x = sched.add_noise(init, torch.randn(shape, generator=g), ts[:1])
    draws_ref = []
    for t in ts:
        before = g.get_state().clone()
        x = sched.step(_dummy(sched.scale_model_input(x, t), t), t, x, **step_kw).prev_sample
        draws_ref.append(not torch.equal(before, g.get_state()))

    ours = get_scheduler(SD15, name)
    plan = sd_plan(ours, n, None, strength)
    np.testing.assert_array_equal(plan.timesteps, ts.numpy())
    g = torch.Generator().manual_seed(0)
    y = ours.add_noise(plan, init.numpy(), torch.randn(shape, generator=g).numpy(), 0)
    state, draws = ours.init_state(plan), []
    for i, t in enumerate(plan.timesteps):
        mo = _dummy(ours.scale_model_input(plan, i, y), t)
        draws.append(ours.noise_needed(plan, i))
        noise = torch.randn(mo.shape, generator=g).numpy() if draws[-1] else None
        y, _, state = ours.step(plan, i, mo, y, state, noise=noise)
    assert draws == draws_ref
    np.testing.assert_allclose(y, x.numpy(), atol=1e-5, rtol=0)
