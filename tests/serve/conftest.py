"""Fixtures of the server tests: the real ``latentrt serve`` in a subprocess on a free loopback port,
serving the tiny bundles (LCM from tests/conftest.py, a tiny SD and the tiny upscaler built here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import ServerProcess


def _tiny_bundle(tmp_path_factory, name: str, save) -> Path:
    from latentrt.export.bundle import export_bundle

    root = tmp_path_factory.mktemp(name)
    save(root / "model")
    export_bundle(root / "model", root / "bundle", check=False, progress=lambda *_: None)
    return root / "bundle"


@pytest.fixture(scope="session")
def sd_serve_bundle(tmp_path_factory):
    from latentrt.export.tiny import save_tiny_sd

    return _tiny_bundle(tmp_path_factory, "serve-sd", save_tiny_sd)


@pytest.fixture(scope="session")
def upscaler_serve_bundle(tmp_path_factory):
    from latentrt.export.tiny import save_tiny_upscaler

    return _tiny_bundle(tmp_path_factory, "serve-upscaler", save_tiny_upscaler)


@pytest.fixture(scope="session")
def server(lcm_bundle, sd_serve_bundle, upscaler_serve_bundle):
    """The main server: three models, batches of up to 4 images gathered for 300 ms."""
    s = ServerProcess(f"lcm={lcm_bundle}", f"sd={sd_serve_bundle}", f"upscaler={upscaler_serve_bundle}",
                      "--max-batch", "4", "--batch-wait-ms", "300", "--max-body-mb", "1")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def strict_server(lcm_bundle):
    """An API key, no batching, a queue of one and a 2 s deadline."""
    s = ServerProcess(f"lcm={lcm_bundle}", "--api-key", "sekrit", "--max-batch", "1", "--max-queue", "1",
                      "--timeout-s", "2")
    yield s
    s.stop()
