"""Public ``encode_prompt`` (issue 17 item 5): diffusers' embeddings, and cached embeddings give the
prompt's image (LCM, SD, SDXL with pooled embeddings, the latent upscaler)."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

import latentrt

TOL = 1e-4
PROMPTS = ["a red cat on a hill", "a blue dog"]
NEGS = ["blurry", "dark"]


@contextlib.contextmanager
def _text_model_alias(pipe):
    """diffusers' clip_skip path reads ``text_encoder.text_model``, which transformers 5 removed: alias it
    (outside the module registry) for the reference call only."""
    te = pipe.text_encoder
    if hasattr(te, "text_model"):
        yield
        return
    object.__setattr__(te, "text_model", te)
    try:
        yield
    finally:
        del te.__dict__["text_model"]


def _export(ref, out):
    from latentrt.export.bundle import export_bundle

    export_bundle(None, out, pipe=ref, check=False, progress=lambda *_: None)
    return latentrt.load(out)


def _close(ours, ref):
    if ref is None:
        assert ours is None
        return
    ref = ref.numpy()
    assert ours.shape == ref.shape
    assert float(np.abs(ours - ref).max()) <= TOL


def _same_image(pipe, by_text: dict, by_embeds: dict, **kw):
    a = pipe(**by_text, generator=5, output_type="np", **kw).images
    b = pipe(**by_embeds, generator=5, output_type="np", **kw).images
    assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from latentrt.export.tiny import tiny_sd_pipeline

    ref = tiny_sd_pipeline(0)
    return ref, _export(ref, tmp_path_factory.mktemp("bundles") / "sd")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from latentrt.export.tiny import tiny_sdxl_pipeline

    ref = tiny_sdxl_pipeline(0)
    return ref, _export(ref, tmp_path_factory.mktemp("bundles") / "sdxl")


@pytest.mark.parametrize("n,clip_skip", [(1, None), (2, 1)])
def test_sd_matches_diffusers(sd, n, clip_skip):
    ref, ours = sd
    with torch.no_grad(), _text_model_alias(ref):
        want = ref.encode_prompt(PROMPTS, "cpu", n, True, negative_prompt=NEGS, clip_skip=clip_skip)
    got = ours.encode_prompt(PROMPTS, NEGS, num_images_per_prompt=n, clip_skip=clip_skip)
    for g, w in zip(got, want):
        _close(g, w)
    pe, npe = ours.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert npe is None and pe.shape == (2, *got[0].shape[1:])


def test_sd_cached_embeddings_give_the_prompts_image(sd):
    _, ours = sd
    pe, npe = ours.encode_prompt(PROMPTS, NEGS, clip_skip=1)
    _same_image(ours, dict(prompt=PROMPTS, negative_prompt=NEGS, clip_skip=1),
                dict(prompt_embeds=pe, negative_prompt_embeds=npe), num_inference_steps=3, num_images_per_prompt=2)


def test_lcm_matches_diffusers_and_images(tiny_lcm_pipe, lcm_bundle):
    ours = latentrt.load(lcm_bundle)
    with torch.no_grad(), _text_model_alias(tiny_lcm_pipe):
        want, _ = tiny_lcm_pipe.encode_prompt(PROMPTS, "cpu", 2, False, clip_skip=1)
    pe, npe = ours.encode_prompt(PROMPTS, num_images_per_prompt=2, clip_skip=1)
    assert npe is None  # LCM guides through its UNet's guidance embedding, never by a negative prompt
    _close(pe, want)
    pe, _ = ours.encode_prompt(PROMPTS)
    _same_image(ours, dict(prompt=PROMPTS), dict(prompt_embeds=pe), num_inference_steps=2)


@pytest.mark.parametrize("negative", [None, NEGS])
def test_sdxl_matches_diffusers(sdxl, negative):
    ref, ours = sdxl
    with torch.no_grad():
        want = ref.encode_prompt(PROMPTS, prompt_2=["a cat", "a dog"], device="cpu", num_images_per_prompt=2,
                                 negative_prompt=negative, clip_skip=1)
    got = ours.encode_prompt(PROMPTS, ["a cat", "a dog"], negative, num_images_per_prompt=2, clip_skip=1)
    assert len(got) == 4
    for g, w in zip(got, want):
        _close(g, w)


def test_sdxl_cached_embeddings_give_the_prompts_image(sdxl):
    _, ours = sdxl
    pe, npe, ppe, nppe = ours.encode_prompt(PROMPTS, negative_prompt=NEGS)
    _same_image(ours, dict(prompt=PROMPTS, negative_prompt=NEGS),
                dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                     negative_pooled_prompt_embeds=nppe), num_inference_steps=2)


def test_upscaler_matches_diffusers_and_images(tmp_path):
    from latentrt.export.tiny import tiny_upscaler_pipeline

    ref = tiny_upscaler_pipeline(0)
    ours = _export(ref, tmp_path / "upscaler")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        want = ref.encode_prompt(PROMPTS, "cpu", True, NEGS)
    got = ours.encode_prompt(PROMPTS, NEGS)
    for g, w in zip(got, want):
        _close(g, w)
    pe, npe, ppe, nppe = got
    low = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    _same_image(ours, dict(prompt=PROMPTS, negative_prompt=NEGS),
                dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                     negative_pooled_prompt_embeds=nppe), image=low, num_inference_steps=2)
