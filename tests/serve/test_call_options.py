"""LoRA weights, LoRA scale and FreeU through the server: the OpenAI extra fields and A1111's
``<lora:NAME:WEIGHT>`` prompt syntax reach the pipeline (the served image is the library's for the same
arguments), and bad values are a 400 before anything queues (the server stays up)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import png_array

import latentrt
from latentrt.serve.api_a1111 import job as a1111_job
from latentrt.serve.app import Server, create_app
from latentrt.serve.call_options import a1111_lora_tags, option_params
from latentrt.serve.errors import BadRequest
from latentrt.serve.worker import Worker

FREEU = [0.9, 0.2, 1.2, 1.4]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The tiny LCM with a LoRA kept as an adapter (named "style") and the FreeU input."""
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import save_tiny_lora, tiny_lcm_pipeline

    root = tmp_path_factory.mktemp("options")
    pipe = tiny_lcm_pipeline(0)
    lora = save_tiny_lora(root / "style.safetensors", pipe, rank=4, seed=2, scale=0.4)
    export_bundle(None, root / "bundle", pipe=pipe, check="off", progress=lambda *_: None, freeu=True,
                  loras=[f"{lora}:1.0:style"], lora_mode="adapter")
    return root / "bundle"


@pytest.fixture(scope="module")
def client(bundle, lcm_bundle):
    server = Server({"opt": Worker("opt", latentrt.load(bundle)).start(),
                     "plain": Worker("plain", latentrt.load(lcm_bundle)).start()})
    server.ready = True
    yield TestClient(create_app(server))
    server.stop()


def _library(bundle, **kw):
    out = latentrt.load(bundle)("a fox", height=64, width=64, num_inference_steps=2, generator=5, output_type="np", **kw)
    return np.round(out.images[0] * 255).astype(np.uint8)


def test_openai_fields_reach_the_pipeline(client, bundle):
    body = {"model": "opt", "prompt": "a fox", "size": "64x64", "seed": 5, "num_inference_steps": 2}
    plain = png_array(client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"])
    r = client.post("/v1/images/generations", json={**body, "lora_weights": {"style": 0.3}, "lora_scale": 0.5,
                                                    "freeu": FREEU})
    assert r.status_code == 200, r.text
    got = png_array(r.json()["data"][0]["b64_json"])
    want = _library(bundle, lora_weights={"style": 0.3}, lora_scale=0.5, freeu=tuple(FREEU))
    assert np.array_equal(got, want) and not np.array_equal(got, plain)


def test_a1111_lora_tag_reaches_the_pipeline(client, bundle):
    body = {"prompt": "a fox <lora:style:0.3>", "steps": 2, "width": 64, "height": 64, "seed": 5,
            "sd_model_checkpoint": "opt"}
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "opt"})
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert np.array_equal(png_array(r.json()["images"][0]), _library(bundle, lora_weights={"style": 0.3}))


@pytest.mark.parametrize("extra, words", [
    ({"lora_weights": {"nope": 0.5}}, "does not have"),
    ({"lora_weights": {"style": "high"}}, "must be a finite number"),
    ({"lora_weights": [0.5]}, "lora_weights must be an object"),
    ({"lora_scale": "big"}, "lora_scale must be a finite number"),
    ({"freeu": [1, 2, 3]}, "four numbers"),
    ({"model": "plain", "freeu": FREEU}, "--freeu"),
    ({"model": "plain", "lora_weights": {"style": 0.5}}, "no LoRA adapters"),
])
def test_bad_option_values_are_a_400(client, extra, words):
    body = {"model": "opt", "prompt": "a fox", "size": "64x64", "num_inference_steps": 1, **extra}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert client.get("/health").status_code == 200


def test_field_parsing():
    assert a1111_lora_tags("a cat <lora:style:0.7>, <lora:detail> at dusk") == ("a cat , at dusk",
                                                                                 {"style": 0.7, "detail": 1.0})
    with pytest.raises(BadRequest, match="must be a number"):
        a1111_lora_tags("<lora:style:lots>")
    assert option_params({"lora_scale": "0.5", "freeu": "[1, 1, 1, 1]"}) == {"lora_scale": 0.5, "freeu": [1.0] * 4}
    with pytest.raises(BadRequest, match="not both"):
        option_params({"lora_weights": {"a": 1}}, {"b": 1.0})
    job = a1111_job({"prompt": "x <lora:style:0.2>", "freeu": FREEU}, img2img=False)
    assert job.prompt == "x" and job.params["lora_weights"] == {"style": 0.2} and job.params["freeu"] == FREEU


@pytest.fixture(scope="module")
def ip_bundle(tmp_path_factory):
    """The tiny LCM with a tiny IP-Adapter (its weight file on disk, as diffusers writes it)."""
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import tiny_lcm_pipeline
    from latentrt.export.tiny_ip_adapter import save_tiny_ip_adapter

    root = tmp_path_factory.mktemp("ip")
    pipe = tiny_lcm_pipeline(0)
    export_bundle(None, root / "bundle", pipe=pipe, check="off", progress=lambda *_: None,
                  ip_adapter=save_tiny_ip_adapter(root / "ip", pipe.unet))
    return root / "bundle"


def test_openai_image_prompt_reaches_the_pipeline(ip_bundle):
    import base64
    import io

    from PIL import Image

    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    server = Server({"ip": Worker("ip", latentrt.load(ip_bundle)).start()})
    server.ready = True
    try:
        client = TestClient(create_app(server))
        body = {"prompt": "a fox", "size": "64x64", "seed": 5, "num_inference_steps": 2}
        plain = png_array(client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"])
        r = client.post("/v1/images/generations", json={**body, "ip_adapter_image": b64, "ip_adapter_scale": 0.8})
        assert r.status_code == 200, r.text
        got = png_array(r.json()["data"][0]["b64_json"])
        want = _library(ip_bundle, ip_adapter_image=Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
                        ip_adapter_scale=0.8)
        assert np.array_equal(got, want) and not np.array_equal(got, plain)
        for extra, words in [({"ip_adapter_image": "not base64!"}, "not valid base64"),
                             ({"ip_adapter_image": base64.b64encode(b"junk").decode()}, "does not decode"),
                             ({"ip_adapter_scale": 0.5}, "needs an image prompt"),
                             ({"ip_adapter_image": b64, "ip_adapter_scale": "lots"}, "must be a number")]:
            bad = client.post("/v1/images/generations", json={**body, **extra})
            assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text
    finally:
        server.stop()


def test_image_prompt_on_a_bundle_without_an_ip_adapter_is_a_400(client):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    r = client.post("/v1/images/generations", json={"model": "plain", "prompt": "a fox", "size": "64x64",
                                                    "ip_adapter_image": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 400 and "has no IP-Adapter" in r.json()["error"]["message"], r.text
