"""The server reports the safety checker's verdicts through HTTP: OpenAI (``nsfw_content_detected`` per
image in ``data``) and A1111 (``info``), ``--safety-checker on|off``."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from serve_helpers import ServerProcess, png_array

import latentrt
from latentrt.runtime.clip_image import clip_preprocess
from latentrt.runtime.safety import checker_for
from latentrt.serve.worker import GroupNoise

from safety_helpers import aimed_concepts

PROMPT, SEED, STEPS = "a lighthouse at dusk", 11, 2


def _served_call(pipe, **kw):
    """What the server's worker runs for one request of 2 images (its own noise per request)."""
    return pipe([PROMPT, PROMPT], generator=GroupNoise([(np.random.default_rng(SEED), 2)]), num_inference_steps=STEPS,
                num_images_per_prompt=1, output_type="pil", **kw)


@pytest.fixture(scope="module")
def served_bundle(safe_cases, tmp_path_factory):
    """The LCM safety bundle with concept data aimed at the served request's two images."""
    bundle = tmp_path_factory.mktemp("safety-serve") / "safe"
    shutil.copytree(safe_cases("lcm").bundle, bundle, ignore=shutil.ignore_patterns(".cache"))
    pipe = latentrt.load(bundle)
    images = _served_call(pipe, safety_checker=False).images
    pixels = clip_preprocess(images, checker_for(pipe).image_config)
    e = pipe.run_lazy("safety_checker", pixel_values=pixels)["image_embeds"]
    buf = io.BytesIO()
    np.savez(buf, **aimed_concepts(e[0], e[1]))
    (bundle / "safety_checker" / "concepts.npz").write_bytes(buf.getvalue())
    m = json.loads((bundle / "latentrt.json").read_text())
    m["extra"]["safety_checker"]["concepts"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (bundle / "latentrt.json").write_text(json.dumps(m))
    out = _served_call(latentrt.load(bundle))
    assert out.nsfw_content_detected == [True, False]
    return bundle, [np.asarray(im) for im in out.images]


def test_default_reports_verdicts_per_image(served_bundle, lcm_bundle):
    bundle, want = served_bundle
    server = ServerProcess(f"safe={bundle}", f"plain={lcm_bundle}", "--max-batch", "2")
    try:
        r = httpx.post(server.url + "/v1/images/generations", timeout=60, json={
            "model": "safe", "prompt": PROMPT, "n": 2, "seed": SEED, "num_inference_steps": STEPS})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["nsfw_content_detected"] for d in data] == [True, False]
        got = [png_array(d["b64_json"]) for d in data]
        assert not got[0].any() and got[1].std() > 1
        np.testing.assert_array_equal(got[1], want[1])
        r = httpx.post(server.url + "/sdapi/v1/txt2img", timeout=60, json={
            "model": "safe", "prompt": PROMPT, "batch_size": 2, "seed": SEED, "steps": STEPS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert json.loads(body["info"])["nsfw_content_detected"] == [True, False]
        assert not png_array(body["images"][0]).any() and png_array(body["images"][1]).std() > 1
        r = httpx.post(server.url + "/v1/images/generations", timeout=60, json={
            "model": "plain", "prompt": PROMPT, "seed": SEED, "num_inference_steps": 1})
        assert r.status_code == 200 and "nsfw_content_detected" not in r.json()["data"][0]  # no checker: no field
    finally:
        assert server.stop() == 0


def test_off_serves_unchecked_images(served_bundle):
    bundle, _ = served_bundle
    server = ServerProcess(f"safe={bundle}", "--safety-checker", "off", "--no-warmup")
    try:
        r = httpx.post(server.url + "/v1/images/generations", timeout=60, json={
            "prompt": PROMPT, "n": 2, "seed": SEED, "num_inference_steps": STEPS})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert all("nsfw_content_detected" not in d for d in data)
        assert png_array(data[0]["b64_json"]).std() > 1  # the image the checker would black out
        r = httpx.post(server.url + "/sdapi/v1/txt2img", timeout=60, json={"prompt": PROMPT, "steps": 1})
        assert "nsfw_content_detected" not in json.loads(r.json()["info"])
    finally:
        server.stop()


def test_on_refuses_a_bundle_without_a_checker(lcm_bundle):
    with pytest.raises(RuntimeError, match="has no safety checker"):
        ServerProcess(f"plain={lcm_bundle}", "--safety-checker", "on", timeout_s=60)
