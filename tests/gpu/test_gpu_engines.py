"""GPU checks (skipped without CUDA / TensorRT; never faked). Run on a GPU machine with
``python -m pytest -q tests/gpu``. Reference: the fp32 bundle on ONNX Runtime CPU; fp16 tolerance
2e-2 on the 0-1 image, as for the fp16 export itself."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import latentrt

FP16_TOL = 2e-2
PROMPT = "a photograph of an astronaut riding a horse"
TINY_PROFILE = {"name": "tiny-gpu", "pipeline": "lcm", "dims": {"B": [1, 1, 2], "H": [32, 64, 128], "W": [32, 64, 128]},
                "precision": {"default": "fp16"}, "builder": {"workspace_gib": 2, "optimization_level": 3}}


def _image(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=8.0, generator=0, output_type="np", **kw).images


@pytest.fixture(scope="module")
def reference(lcm_bundle):
    pipe = latentrt.load(lcm_bundle)
    return {"square": _image(pipe), "wide": _image(pipe, height=64, width=96)}


def _assert_close(got, want, tol=FP16_TOL):
    assert np.isfinite(got).all(), "NaN/inf in the image"
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max abs image difference {err:.3g} > {tol}"
    return err


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_torch_cuda_fp16_matches_cpu(lcm_bundle_fp16, reference, cuda_graphs):
    pipe = latentrt.load(lcm_bundle_fp16, backend="torch", device="cuda", cuda_graphs=cuda_graphs)
    assert pipe.engines["unet"].dtype.__repr__() == "torch.float16"
    for _ in range(2):  # the second call replays the captured graphs
        _assert_close(_image(pipe), reference["square"])
    _assert_close(_image(pipe, height=64, width=96), reference["wide"])  # another shape: another graph
    _assert_close(_image(pipe), reference["square"])


@pytest.mark.gpu
def test_torch_cuda_graphs_equal_eager(lcm_bundle_fp16):
    eager = latentrt.load(lcm_bundle_fp16, backend="torch", device="cuda", cuda_graphs=False)
    graphs = latentrt.load(lcm_bundle_fp16, backend="torch", device="cuda", cuda_graphs=True)
    a, b = _image(eager), _image(graphs)
    assert float(np.abs(a - b).max()) <= 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_torch_cuda_device_loop_equals_host_loop(lcm_bundle_fp16, cuda_graphs):
    """On CUDA the loop keeps latents on the GPU by default (device_loop); the host loop gives the same
    image up to float32 rounding (the GPU may fuse multiply-adds)."""
    device = latentrt.load(lcm_bundle_fp16, backend="torch", device="cuda", cuda_graphs=cuda_graphs)
    host = latentrt.load(lcm_bundle_fp16, backend="torch", device="cuda", cuda_graphs=cuda_graphs, device_loop=False)
    assert device.engines["unet"].device_loop and not host.engines["unet"].device_loop
    seen = []
    got = _image(device, callback_on_step_end=lambda p, i, t, d: seen.append(d["latents"].is_cuda) or d)
    assert seen == [True] * 4
    assert float(np.abs(got - _image(host)).max()) <= 1e-4


@pytest.mark.gpu
def test_onnxruntime_cuda_io_binding(lcm_bundle_fp16, reference):
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with the CUDA execution provider is not installed")
    pipe = latentrt.load(lcm_bundle_fp16, device="cuda")
    _assert_close(_image(pipe), reference["square"])
    # device-resident I/O: torch CUDA tensors in, torch CUDA tensors out
    eng = latentrt.load(lcm_bundle_fp16, device="cuda", return_torch=True).engines["vae_decoder"]
    lat = torch.randn(1, 4, 8, 8, device="cuda", dtype=torch.float16)
    out = eng(latent_sample=lat)["sample"]
    assert out.is_cuda and tuple(out.shape) == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.fixture
def trt_bundle(lcm_bundle_fp16, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(lcm_bundle_fp16, dst, ignore=shutil.ignore_patterns(".cache"))
    return dst


@pytest.mark.tensorrt
def test_tensorrt_build_and_run(trt_bundle, reference):
    from latentrt.export.tensorrt_build import build_engines
    from latentrt.profiles import parse_profile
    from latentrt.spec import SpecError

    profile = parse_profile(TINY_PROFILE)
    log = []
    build_engines(trt_bundle, profile, progress=log.append)
    assert list((trt_bundle / "engines").glob("timing-*.cache")), "timing cache not kept"
    pipe = latentrt.load(trt_bundle, backend="tensorrt", device="cuda")
    for _ in range(3):  # eager, capture, replay
        _assert_close(_image(pipe), reference["square"])
    _assert_close(_image(pipe, height=64, width=96), reference["wide"])
    with pytest.raises(SpecError, match=r"H=256 is outside the \w+ engine's profile range \[32, 128\]"):
        pipe(PROMPT, num_inference_steps=1, height=256, width=64, output_type="np")
    log.clear()
    build_engines(trt_bundle, profile, progress=log.append)
    assert sum("up to date" in line for line in log) == 4


@pytest.mark.tensorrt
def test_tensorrt_refuses_foreign_engine(trt_bundle):
    from latentrt.engine_cache import EngineCacheError
    from latentrt.export.tensorrt_build import build_engines
    from latentrt.manifest import read_manifest
    from latentrt.profiles import parse_profile

    build_engines(trt_bundle, parse_profile(TINY_PROFILE), components=["vae_decoder"], progress=lambda *_: None)
    m = read_manifest(trt_bundle)
    for rec in m.extra["engines"].values():
        rec["tensorrt"] = "0.0.0"
    m.write(trt_bundle)
    from latentrt.runtime.bundle import Bundle

    with pytest.raises(EngineCacheError, match="built with TensorRT 0.0.0; this machine has TensorRT"):
        Bundle(trt_bundle).engine("vae_decoder", "tensorrt", "cuda")
