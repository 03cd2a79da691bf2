"""The AUTOMATIC1111 API (``/sdapi/v1``) against the real server, as its clients call it."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import png_array, png_bytes

import latentrt


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_txt2img_equals_the_library(http, lcm_bundle):
    body = {"prompt": "a castle", "negative_prompt": "", "seed": 21, "steps": 2, "cfg_scale": 5.0, "width": 64,
            "height": 64, "sampler_name": "LCM", "batch_size": 2, "n_iter": 1,
            "override_settings": {"sd_model_checkpoint": "lcm"}}
    r = http.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["seed"] == 21 and info["sd_model_name"] == "lcm" and len(out["images"]) == 2
    want = latentrt.load(lcm_bundle)("a castle", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                                     num_images_per_prompt=2, generator=21, scheduler="LCMScheduler").images
    for got, w in zip(out["images"], want):
        np.testing.assert_array_equal(png_array(got), np.asarray(w))


def test_img2img_and_random_seed(http):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    body = {"prompt": "a watercolor", "init_images": [base64.b64encode(png_bytes(image)).decode()], "seed": -1,
            "steps": 3, "denoising_strength": 0.5, "sampler_name": "Euler a", "cfg_scale": 7,
            "override_settings": {"sd_model_checkpoint": "sd"}}
    r = http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert png_array(r.json()["images"][0]).shape == (64, 64, 3)
    assert json.loads(r.json()["info"])["seed"] >= 0  # -1: the server drew one, and says which


def test_listings_and_options(http):
    models = http.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["lcm", "sd", "upscaler"]
    samplers = {s["name"]: s["aliases"][0] for s in http.get("/sdapi/v1/samplers").json()}
    assert samplers["Euler a"] == "EulerAncestralDiscreteScheduler" and "DPM++ 2M" in samplers
    assert {s["name"] for s in http.get("/sdapi/v1/schedulers").json()} == {"automatic", "karras"}
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "lcm"
    try:
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd"}).status_code == 200
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd"
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
        assert json.loads(r.json()["info"])["sd_model_name"] == "sd"  # the current model serves requests
    finally:
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "lcm"})
    r = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 404 and "not loaded" in r.json()["detail"]
    r = http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert r.status_code == 501 and "CLIP_stop_at_last_layers" in r.json()["detail"]


def test_progress_when_idle_and_interrupt(http):
    p = http.get("/sdapi/v1/progress").json()
    assert p["progress"] == 0 and p["state"]["job_count"] == 0 and p["current_image"] is None
    assert http.post("/sdapi/v1/interrupt").status_code == 200


@pytest.mark.parametrize("field, value, status, words", [
    ("enable_hr", True, 501, "enable_hr is not supported"),
    ("restore_faces", True, 501, "restore_faces"),
    ("alwayson_scripts", {"controlnet": {}}, 501, "alwayson_scripts"),
    ("sampler_name", "Heun", 400, "GET /sdapi/v1/samplers"),
    ("scheduler", "Polyexponential", 400, "schedule type"),
    ("width", 60, 400, "not a multiple of 8"),
    ("steps", 0, 400, "num_inference_steps must be a positive integer"),
    ("seed", "abc", 400, "seed must be an integer"),
])
def test_what_latentrt_cannot_do_is_a_clear_4xx_or_501(http, field, value, status, words):
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, field: value})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_img2img_needs_an_image(http):
    r = http.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["@@@"]})
    assert r.status_code == 400 and "base64" in r.json()["detail"]
    r = http.post("/sdapi/v1/img2img", json={"prompt": "x", "mask": "abc", "init_images": ["x"]})
    assert r.status_code == 501 and "mask" in r.json()["detail"]
