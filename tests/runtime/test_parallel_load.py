"""A pipeline creates its CPU engines in parallel threads (a new process waits for the slowest component,
not the sum), gets the same engines as one at a time, and a component that fails to load fails the load
with that component's own error."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import latentrt
from latentrt.manifest import BundleError
from latentrt.runtime.bundle import Bundle


def test_engines_are_created_in_parallel_threads(lcm_bundle, monkeypatch):
    threads, real = {}, Bundle.engine

    def engine(self, component, *args, **kw):
        threads[component] = threading.current_thread().name
        return real(self, component, *args, **kw)

    monkeypatch.setattr(Bundle, "engine", engine)
    pipe = latentrt.load(lcm_bundle)
    assert set(threads) == set(pipe.engines) and len(threads) >= 3
    assert all(name.startswith("latentrt-load") for name in threads.values())
    monkeypatch.undo()
    a = pipe("a cat", height=64, width=64, num_inference_steps=2, generator=1, output_type="np").images
    from latentrt.runtime.pipelines import base

    monkeypatch.setattr(base, "_create_engines", lambda bundle, names, backend, device, options: {
        c: bundle.engine(c, backend, device, **options) for c in names})  # one at a time
    b = latentrt.load(lcm_bundle)("a cat", height=64, width=64, num_inference_steps=2, generator=1,
                                  output_type="np").images
    assert np.array_equal(a, b)


def test_a_failing_component_fails_the_load_with_its_error(lcm_bundle, monkeypatch):
    real = Bundle.engine

    def engine(self, component, *args, **kw):
        if component == "vae_decoder":
            raise BundleError(f"{self.path}: component 'vae_decoder' is broken (test)")
        return real(self, component, *args, **kw)

    monkeypatch.setattr(Bundle, "engine", engine)
    with pytest.raises(BundleError, match="'vae_decoder' is broken"):
        latentrt.load(lcm_bundle)
