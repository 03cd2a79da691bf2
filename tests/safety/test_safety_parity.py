"""Parity with diffusers' safety checker: the same tiny checker (saved, loaded back by diffusers), the same
noise, fp32: ``nsfw_content_detected`` and the images (the flagged one black) within 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest

import latentrt
from latentrt.runtime.random import TorchGeneratorNoise

from safety_helpers import CALL, SEED, call_of

TOL = 1e-4
KINDS = ["lcm", "sd", "lcm-img2img"]


@pytest.fixture(scope="module")
def loaded():
    pipes = {}

    def get(case):
        if case.kind not in pipes:
            pipes[case.kind] = latentrt.load(case.bundle)
        return pipes[case.kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_the_checker_changes_diffusers_output(kind, safe_cases):
    case = safe_cases(kind)
    assert case.ref.nsfw_content_detected == [True, False]
    assert float(np.abs(case.ref.images[0]).max()) == 0.0  # blacked out
    assert float(case.plain[0].std()) > 1e-2  # it was a picture
    np.testing.assert_array_equal(case.ref.images[1], case.plain[1])  # the other one untouched


@pytest.mark.parametrize("kind", KINDS)
def test_nsfw_and_images_match_diffusers(kind, safe_cases, loaded):
    case = safe_cases(kind)
    out = loaded(case)(**call_of(kind), generator=TorchGeneratorNoise(SEED))
    assert out.nsfw_content_detected == case.ref.nsfw_content_detected == [True, False]
    assert out.images.shape == case.ref.images.shape
    err = float(np.abs(out.images - case.ref.images).max())
    assert err <= TOL, f"max abs image difference {err:.3g} > {TOL}"
    assert float(np.abs(out.images[0]).max()) == 0.0 and float(out.images[1].std()) > 1e-2


def test_pil_output_blacks_out_the_flagged_image(safe_cases, loaded):
    case = safe_cases("lcm")
    out = loaded(case)(**{**CALL, "output_type": "pil"}, generator=TorchGeneratorNoise(SEED))
    assert out.nsfw_content_detected == [True, False]
    a, b = (np.asarray(im) for im in out.images)
    assert a.shape == b.shape == case.ref.images[0].shape[:2] + (3,) and not a.any()
    want = (case.ref.images[1] * 255).round().astype(np.uint8)
    assert int(np.abs(b.astype(int) - want).max()) <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_off_per_call(kind, safe_cases, loaded):
    """safety_checker=False: no check (None, as diffusers without a checker), both images as drawn."""
    case = safe_cases(kind)
    out = loaded(case)(**call_of(kind), generator=TorchGeneratorNoise(SEED), safety_checker=False)
    assert out.nsfw_content_detected is None
    err = float(np.abs(out.images - case.plain).max())
    assert err <= TOL and float(out.images[0].std()) > 1e-2
    on = loaded(case)(**call_of(kind), generator=TorchGeneratorNoise(SEED), safety_checker=True)  # and on again
    assert on.nsfw_content_detected == [True, False]


def test_latent_output_has_no_verdict(safe_cases, loaded):
    case = safe_cases("lcm")
    out = loaded(case)(**{**CALL, "output_type": "latent"}, generator=TorchGeneratorNoise(SEED))
    assert out.nsfw_content_detected is None and out.images.ndim == 4


def test_bundle_carries_checker_data_and_feature_extractor(safe_cases):
    case = safe_cases("lcm")
    m = json.loads((case.bundle / "latentrt.json").read_text())
    assert "safety_checker" in m["components"] and m["extra"]["safety_checker"]["concepts"]["path"] == \
        "safety_checker/concepts.npz"
    index = json.loads((case.bundle / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    fe = json.loads((case.bundle / "feature_extractor" / "preprocessor_config.json").read_text())
    assert fe["crop_size"] == {"height": 32, "width": 32}


def test_bundle_without_checker_reports_none(lcm_bundle):
    out = latentrt.load(lcm_bundle)("a cat", num_inference_steps=1, generator=0, output_type="np")
    assert out.nsfw_content_detected is None
