"""ONNX Runtime I/O binding (made for the CUDA / TensorRT providers) run on the CPU provider:
the binding code path against plain ``session.run`` on the same inputs."""

from __future__ import annotations

import numpy as np
import torch

from latentrt.check import check_inputs
from latentrt.runtime.bundle import Bundle


def test_io_binding_matches_plain_run(lcm_bundle):
    b = Bundle(lcm_bundle)
    spec = b.manifest.components["unet"].spec
    feeds = check_inputs(spec, {"B": 2, "H": 64, "W": 96}, b.constants, np.random.default_rng(1))
    plain = b.engine("unet", optimized_cache=False)(**feeds)["out_sample"]
    bound = b.engine("unet", optimized_cache=False, io_binding=True)
    assert bound.io_binding and not b.engine("unet", optimized_cache=False).io_binding
    np.testing.assert_array_equal(bound(**feeds)["out_sample"], plain)
    # tensors in (bound by pointer), tensors out (allocated from the spec), chained into the next call
    as_torch = b.engine("unet", optimized_cache=False, io_binding=True, return_torch=True)
    out = as_torch(**{k: torch.from_numpy(v) for k, v in feeds.items()})["out_sample"]
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 4, 8, 12)
    np.testing.assert_array_equal(out.numpy(), plain)
    again = as_torch(**{**{k: torch.from_numpy(v) for k, v in feeds.items()}, "sample": out})["out_sample"]
    ref = b.engine("unet", optimized_cache=False)(**{**feeds, "sample": plain})["out_sample"]
    np.testing.assert_allclose(again.numpy(), ref, rtol=0, atol=1e-6)
