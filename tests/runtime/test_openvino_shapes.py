"""Static shapes on the openvino backend: compiled per concrete input shape on first use, kept for
the last ``max_shapes`` shapes, persisted in OpenVINO's model cache under a key of model, precision,
shape and OpenVINO version (one folder per key), and the same images as the dynamic model."""

from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")

import latentrt  # noqa: E402
from latentrt.runtime.bundle import Bundle  # noqa: E402
from latentrt.runtime.engines.openvino import compiled_key  # noqa: E402

CALL = dict(prompt="a photograph of an astronaut riding a horse", num_inference_steps=2, output_type="np")


def _latents(h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, h, w)).astype(np.float32)


def test_static_matches_dynamic(lcm_bundle):
    static = latentrt.load(lcm_bundle, backend="openvino", precision="fp32", shapes="static")
    dynamic = latentrt.load(lcm_bundle, backend="openvino", precision="fp32")
    assert dynamic.engines["unet"].shapes == "dynamic"  # the default
    assert static.engines["unet"].shapes == "static" and static.engines["unet"].compiled is None  # nothing compiled at load
    assert dynamic.engines["unet"].compiled is not None
    for size in (64, 96):
        a = static(**CALL, height=size, width=size, generator=3).images
        b = dynamic(**CALL, height=size, width=size, generator=3).images
        assert a.shape == b.shape == (1, size, size, 3)
        assert float(np.abs(a - b).max()) <= 1e-5
    # the text-to-image calls never created the VAE encoder (deferred to image-to-image)
    assert "vae_encoder" not in static.engines and "vae_encoder" not in dynamic.engines


def test_compiles_once_per_shape_and_keeps_the_last_ones(lcm_bundle):
    dec = Bundle(lcm_bundle).engine("vae_decoder", "openvino", precision="fp32", shapes="static", max_shapes=2)
    first = dec(latent_sample=_latents(8, 8))["sample"]
    again = dec(latent_sample=_latents(8, 8))["sample"]
    assert np.array_equal(first, again) and len(dec.compilations) == 1
    dec(latent_sample=_latents(8, 12))
    dec(latent_sample=_latents(8, 8))  # still kept: no compilation
    assert [c["shapes"] for c in dec.compilations] == [(("latent_sample", (1, 4, 8, 8)),), (("latent_sample", (1, 4, 8, 12)),)]
    dec(latent_sample=_latents(12, 12))  # a third shape drops the least recently used (8x12)
    assert len(dec._compiled) == 2
    dec(latent_sample=_latents(8, 12))
    assert len(dec.compilations) == 4 and dec.compilations[-1]["shapes"] == (("latent_sample", (1, 4, 8, 12)),)
    assert tuple(dec.compiled.inputs[0].get_partial_shape().to_shape()) == (1, 4, 8, 12)


def test_compiled_models_persist_per_precision_and_shape(lcm_bundle):
    bundle = Bundle(lcm_bundle)
    dec = bundle.engine("vae_decoder", "openvino", precision="fp32", shapes="static")
    dec(latent_sample=_latents(8, 8))
    folder = dec.compilations[-1]["cache_dir"]
    assert folder is not None and any(p.suffix == ".blob" for p in __import__("pathlib").Path(folder).iterdir())
    # a new engine (a new process would do the same) finds the same folder, and imports from it
    dec2 = bundle.engine("vae_decoder", "openvino", precision="fp32", shapes="static")
    dec2(latent_sample=_latents(8, 8))
    assert dec2.compilations[-1]["cache_dir"] == folder
    assert np.array_equal(dec(latent_sample=_latents(8, 8))["sample"], dec2(latent_sample=_latents(8, 8))["sample"])
    # another shape, precision or OpenVINO version is another folder
    sha, shape = bundle.component_sha("vae_decoder"), (("latent_sample", (1, 4, 8, 8)),)
    keys = {compiled_key(sha, "fp32", shape, ov.__version__, 2), compiled_key(sha, "bf16", shape, ov.__version__, 2),
            compiled_key(sha, "fp32", (("latent_sample", (1, 4, 8, 12)),), ov.__version__, 2),
            compiled_key(sha, "fp32", shape, "0.0.0", 2), compiled_key(sha, "fp32", None, ov.__version__, 2)}
    assert len(keys) == 5
    assert bundle.engine("vae_decoder", "openvino", precision="fp32", shapes="static", cache=False)._compiled_root is None


def test_bad_shape_options(lcm_bundle):
    with pytest.raises(ValueError, match="shapes must be one of .*'static'"):
        latentrt.load(lcm_bundle, backend="openvino", shapes="fixed")
    with pytest.raises(ValueError, match="max_shapes must be a positive integer"):
        latentrt.load(lcm_bundle, backend="openvino", max_shapes=0)
