"""torch backend on CPU: same pipeline, same randomness contract, same image as ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

import latentrt

TOL = 1e-4


@pytest.fixture(scope="module")
def pipes(lcm_bundle):
    return latentrt.load(lcm_bundle), latentrt.load(lcm_bundle, backend="torch")


@pytest.mark.parametrize("kw", [dict(num_inference_steps=4), dict(num_inference_steps=2, height=64, width=96,
                                                                  num_images_per_prompt=2)])
def test_torch_matches_onnxruntime(pipes, kw):
    ort_pipe, torch_pipe = pipes
    a = ort_pipe("a red cat", generator=3, output_type="np", **kw).images
    b = torch_pipe("a red cat", generator=3, output_type="np", **kw).images
    assert np.isfinite(b).all() and a.std() > 1e-2
    err = float(np.abs(a - b).max())
    assert err <= TOL, f"torch vs onnxruntime image max abs diff {err:.3g} > {TOL}"


def test_torch_engine_io_matches_spec(pipes):
    eng = pipes[1].engines["text_encoder"]
    ids = np.zeros((2, 77), dtype=np.int64)
    out = eng(input_ids=ids)
    assert set(out) == {s.name for s in eng.outputs}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in out.values())
    assert eng.outputs_are_reused is False


def test_missing_source_is_a_clear_error(lcm_bundle, tmp_path):
    import shutil

    from latentrt.manifest import read_manifest
    from latentrt.runtime.engines import torch_backend

    dst = tmp_path / "b"
    shutil.copytree(lcm_bundle, dst, ignore=shutil.ignore_patterns(".cache"))
    m = read_manifest(dst)
    m.source = {"id": None, "path": str(tmp_path / "gone"), "revision": None}
    m.write(dst)
    torch_backend._PIPELINES.clear()
    with pytest.raises(FileNotFoundError, match="loads each component from the model the bundle was exported from"
                                                ".*pass source=PATH_OR_HUB_ID"):
        latentrt.load(dst, backend="torch")
