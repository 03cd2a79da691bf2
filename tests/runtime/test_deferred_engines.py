"""The VAE encoder is deferred: a pipeline creates its engine on the first image input, not at load
(a text-to-image process never compiles or holds it), creates it once under concurrent first calls,
checks its profile range before it runs, and gives the same images as an encoder created up front."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import latentrt
from latentrt.runtime.bundle import Bundle
from latentrt.spec import SpecError

CALL = dict(num_inference_steps=2, output_type="np", generator=5)


def _count_engines(monkeypatch):
    made, real = [], Bundle.engine

    def engine(self, component, *args, **kw):
        made.append(component)
        return real(self, component, *args, **kw)

    monkeypatch.setattr(Bundle, "engine", engine)
    return made


def test_text_to_image_never_creates_the_vae_encoder(lcm_bundle, monkeypatch):
    made = _count_engines(monkeypatch)
    pipe = latentrt.load(lcm_bundle)
    assert "vae_encoder" in pipe.bundle.manifest.components and "vae_encoder" not in pipe.engines
    pipe("a cat", height=64, width=64, **CALL)
    assert "vae_encoder" not in pipe.engines and "vae_encoder" not in made
    assert {"text_encoder", "unet", "vae_decoder"} <= set(made)


def test_first_image_input_creates_it_once_with_the_same_images(lcm_bundle, rgb_image, monkeypatch):
    made = _count_engines(monkeypatch)
    pipe = latentrt.load(lcm_bundle)
    out = {}

    def img2img(i):
        out[i] = pipe("a cat", image=rgb_image, strength=0.7, **CALL).images

    threads = [threading.Thread(target=img2img, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made.count("vae_encoder") == 1 and "vae_encoder" in pipe.engines
    eager = latentrt.load(lcm_bundle)
    eager.load_deferred()  # what a server's warm-up does
    assert "vae_encoder" in eager.engines
    ref = eager("a cat", image=rgb_image, strength=0.7, **CALL).images
    assert all(np.array_equal(out[i], ref) for i in range(3))


def test_the_deferred_encoders_profile_range_is_checked_before_it_runs(lcm_bundle, rgb_image, monkeypatch):
    """A TensorRT encoder built for a shape profile carries H/W ranges; created on first use, it is still
    checked before any engine runs, with the usual clear error."""
    real, ran = Bundle.engine, []

    def engine(self, component, *args, **kw):
        e = real(self, component, *args, **kw)
        if component == "vae_encoder":
            e.limits = {"H": (32, 48), "W": (32, 48)}
            inner = e.__call__
            e.__call__ = lambda **kw: (ran.append(1), inner(**kw))[1]
        return e

    monkeypatch.setattr(Bundle, "engine", engine)
    pipe = latentrt.load(lcm_bundle)
    with pytest.raises(SpecError, match="outside the vae_encoder engine's profile range"):
        pipe("a cat", image=rgb_image, strength=0.7, **CALL)  # a 64x96 image
    assert ran == []


def test_a_server_warm_up_creates_it(lcm_bundle):
    from latentrt.serve.worker import Worker

    pipe = latentrt.load(lcm_bundle)
    assert "vae_encoder" not in pipe.engines
    Worker("m", pipe).warm_up()  # not started: warm_up is what the server runs before it takes requests
    assert "vae_encoder" in pipe.engines
