"""Device-resident latents in the denoising loop (latentrt/runtime/pipelines/device_loop.py).

On a GPU the torch backend keeps latents on the device between steps; here the same code path runs
with CPU torch tensors (``device_loop=True``) and must give the host loop's image exactly: the
schedulers run the same float32 arithmetic on torch tensors as on numpy arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import latentrt  # noqa: E402
from latentrt.runtime.schedulers import SCHEDULERS, get_scheduler  # noqa: E402

VARIANTS = [(name, {}, {}) for name in SCHEDULERS] + [
    ("DDIMScheduler", {}, {"eta": 1.0}),
    ("DDIMScheduler", {"prediction_type": "v_prediction"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_small_log"}, {}),
    ("LCMScheduler", {"prediction_type": "v_prediction"}, {}),
]


@pytest.fixture(scope="module")
def sd_scheduler_config():
    from latentrt.export.tiny import tiny_sd_pipeline

    return dict(tiny_sd_pipeline().scheduler.config)


@pytest.mark.parametrize("name, overrides, step_kwargs", VARIANTS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(VARIANTS)])
def test_scheduler_steps_on_torch_tensors_equal_numpy(sd_scheduler_config, name, overrides, step_kwargs):
    """Every scheduler that allows the device loop gives bit-identical steps on torch tensors."""
    sched = get_scheduler({**sd_scheduler_config, **overrides}, name)
    assert sched.device_loop
    plan = sched.plan(6)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * float(plan.init_noise_sigma)
    x_t = torch.from_numpy(x_np.copy())
    state_np, state_t = sched.init_state(plan), sched.init_state(plan)
    for i in range(len(plan.timesteps)):
        model_in = sched.scale_model_input(plan, i, x_np)
        assert np.array_equal(np.asarray(sched.scale_model_input(plan, i, x_t)), model_in)
        pred = (np.tanh(model_in) * 0.5 + 0.01 * i).astype(np.float32)
        noise = rng.standard_normal(x_np.shape).astype(np.float32) if sched.noise_needed(plan, i, **step_kwargs) else None
        out_np = sched.step(plan, i, pred, x_np, state_np, noise=noise, **step_kwargs)
        out_t = sched.step(plan, i, torch.from_numpy(pred.copy()), x_t, state_t,
                           noise=None if noise is None else torch.from_numpy(noise.copy()), **step_kwargs)
        assert isinstance(out_t.prev_sample, torch.Tensor)
        (x_np, state_np), (x_t, state_t) = (out_np.prev_sample, out_np.state), (out_t.prev_sample, out_t.state)
        assert np.array_equal(x_t.numpy(), x_np), f"step {i}"


def _run(pipe, **kw):
    seen = []

    def on_step(p, i, t, tensors):
        seen.append(type(tensors["latents"]).__module__.split(".")[0])
        return tensors

    out = pipe("a red cube on a table", num_inference_steps=4, generator=0, output_type="np",
               callback_on_step_end=on_step, **kw)
    return out.images, seen


def test_lcm_device_loop_equals_host_loop(lcm_bundle):
    host = latentrt.load(lcm_bundle, backend="torch", device_loop=False)
    device = latentrt.load(lcm_bundle, backend="torch", device_loop=True)
    assert device.engines["unet"].device_loop and not host.engines["unet"].device_loop
    ref, seen_host = _run(host)
    calls = []
    unet = device.engines["unet"]
    original = unet.call_on_device
    unet.call_on_device = lambda **kw: calls.append(1) or original(**kw)
    got, seen_device = _run(device)
    assert seen_host == ["numpy"] * 4 and seen_device == ["torch"] * 4  # latents stayed tensors between steps
    assert len(calls) == 4
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert float(np.abs(got - ref).max()) <= 1e-6


@pytest.fixture(scope="module")
def sd_bundle(tmp_path_factory):
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import save_tiny_sd

    root = tmp_path_factory.mktemp("device-loop-sd")
    save_tiny_sd(root / "model")
    export_bundle(root / "model", root / "bundle", check=False, progress=lambda *_: None)
    return root / "bundle"


@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_guided_sd_device_loop_equals_host_loop(sd_bundle, scheduler):
    """Classifier-free guidance ([uncond; cond] doubled on the device), guidance rescale off, and a
    scheduler that draws noise at every step (Euler ancestral): the noise is drawn on the host and
    copied over, so the image is the host loop's."""
    kw = dict(guidance_scale=7.5, negative_prompt="blurry", scheduler=scheduler)
    host = latentrt.load(sd_bundle, backend="torch", device_loop=False)
    device = latentrt.load(sd_bundle, backend="torch", device_loop=True)
    ref, _ = _run(host, **kw)
    got, seen = _run(device, **kw)
    assert seen == ["torch"] * 4
    assert float(np.abs(got - ref).max()) <= 1e-6
    # guidance_rescale needs numpy statistics: that call keeps the host loop
    _, seen = _run(device, guidance_rescale=0.7, **kw)
    assert seen == ["numpy"] * 4


def test_other_backends_keep_the_host_loop(lcm_bundle):
    pipe = latentrt.load(lcm_bundle)  # onnxruntime
    assert not pipe.engines["unet"].device_loop
    _, seen = _run(pipe)
    assert seen == ["numpy"] * 4


def test_reused_output_buffers_are_not_kept_by_schedulers(sd_bundle):
    """With CUDA graphs or TensorRT the UNet returns the same output buffer every step; PNDM keeps
    past model outputs, so the loop must copy a buffer it keeps. Simulated on the CPU: the engine
    writes every output into one tensor."""
    kw = dict(guidance_scale=1.0, scheduler="PNDMScheduler")
    ref, _ = _run(latentrt.load(sd_bundle, backend="torch", device_loop=False), **kw)
    device = latentrt.load(sd_bundle, backend="torch", device_loop=True)
    unet = device.engines["unet"]
    original, buffers = unet.run_on_device, {}

    def one_buffer(arrays):
        out = original(arrays)
        for k, v in out.items():
            buffers.setdefault(k, torch.empty_like(v)).copy_(v)
        return dict(buffers)

    unet.run_on_device, unet.outputs_are_reused = one_buffer, True
    got, seen = _run(device, **kw)
    assert len(seen) >= 4 and set(seen) == {"torch"}  # PNDM: one more UNet call than steps
    assert float(np.abs(got - ref).max()) <= 1e-6


@pytest.mark.parametrize("fixture", ["lcm_bundle", "lcm_bundle_fp16"])
def test_onnxruntime_io_binding_device_loop_equals_host_loop(request, fixture):
    """ONNX Runtime keeps latents on the device through I/O binding; on the CPU provider the same code
    binds CPU tensors. In the fp16 bundle the loop's float32 latents are converted to the graph's fp16."""
    bundle = request.getfixturevalue(fixture)
    ref, _ = _run(latentrt.load(bundle, io_binding=True))
    pipe = latentrt.load(bundle, io_binding=True, device_loop=True)
    got, seen = _run(pipe)
    assert seen == ["torch"] * 4
    assert float(np.abs(got - ref).max()) <= 1e-6


def test_onnxruntime_device_loop_needs_io_binding(lcm_bundle):
    with pytest.raises(ValueError, match="io_binding=True"):
        latentrt.load(lcm_bundle, device_loop=True)
