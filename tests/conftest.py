"""Shared fixtures: tiny random diffusers pipelines and the bundles exported from them.

Everything is built in code (no network) once per test session.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LATENTRT_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    """Skip GPU / TensorRT tests where there is no GPU / TensorRT; they are never faked."""
    have_cuda = _have_cuda()
    have_trt = _have_module("tensorrt") and have_cuda
    for item in items:
        if "gpu" in item.keywords and not have_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not have_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU"))


_TMP_FIXTURES = {"tmp_path", "tmp_path_factory", "tmpdir", "tmpdir_factory"}
_made_by: dict[int, list] = {}  # id(fixturedef) -> the folders its current setup made


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Note the folders a module-, class- or function-scoped fixture makes with ``tmp_path_factory``;
    :func:`pytest_fixture_post_finalizer` removes them once that fixture is torn down. The tiny bundles of
    one test module are tens of MB each, and kept to the end of the session they add up to ~5 GB (a CI
    run on a nearly full disk failed with ENOSPC). Session-scoped fixtures keep theirs to the end."""
    if fixturedef.scope == "session" or fixturedef.argname in _TMP_FIXTURES:
        return (yield)
    base = request.config._tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    try:
        return (yield)
    finally:
        made = [base / n for n in set(os.listdir(base)) - before]
        if made:
            _made_by.setdefault(id(fixturedef), []).extend(made)


def pytest_fixture_post_finalizer(fixturedef, request):
    """After the fixture's own teardown code has run (this hook runs last)."""
    for p in _made_by.pop(id(fixturedef), []):
        shutil.rmtree(p, ignore_errors=True)


def _have_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _have_cuda() -> bool:
    if not _have_module("torch"):
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The diffusers references and export tracing run tiny models, for which torch's thread pool
    costs more than it gives (several times slower with two threads, ~50x on a loaded machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory):
    from latentrt.export.tiny import save_tiny_lcm

    return save_tiny_lcm(tmp_path_factory.mktemp("models") / "tiny-lcm")


@pytest.fixture(scope="session")
def tiny_lcm_pipe(tiny_lcm_dir):
    """The diffusers reference pipeline, loaded from the saved folder like a hub checkpoint."""
    import torch
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(tiny_lcm_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _export(src, out, **kw):
    from latentrt.export.bundle import export_bundle

    export_bundle(src, out, progress=lambda *_: None, **kw)
    return out


@pytest.fixture(scope="session")
def lcm_bundle(tiny_lcm_dir, tmp_path_factory):
    return _export(tiny_lcm_dir, tmp_path_factory.mktemp("bundles") / "lcm-fp32")


@pytest.fixture(scope="session")
def lcm_bundle_fp16(tiny_lcm_dir, tmp_path_factory):
    return _export(tiny_lcm_dir, tmp_path_factory.mktemp("bundles") / "lcm-fp16", precision="fp16")


@pytest.fixture
def rgb_image():
    from PIL import Image

    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8))
