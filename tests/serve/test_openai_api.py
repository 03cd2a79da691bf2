"""The OpenAI Images API, spoken by the official ``openai`` client, against the real server.

Served images must be the library's for the same seed, alone or batched with other requests.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from PIL import Image
from serve_helpers import png_array, png_bytes

import latentrt


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lib(lcm_bundle, sd_serve_bundle, upscaler_serve_bundle):
    """The library's pipelines, for the reference images."""
    return {"lcm": latentrt.load(lcm_bundle), "sd": latentrt.load(sd_serve_bundle),
            "upscaler": latentrt.load(upscaler_serve_bundle)}


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(11)
    return Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def _arrays(resp) -> list[np.ndarray]:
    return [png_array(d.b64_json) for d in resp.data]


def _library(pipe, prompt, seed, **kw) -> list[np.ndarray]:
    return [np.asarray(im) for im in pipe(prompt, generator=seed, output_type="pil", **kw).images]


def _max_diff(a, b) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_models(client):
    assert sorted(m.id for m in client.models.list()) == ["lcm", "sd", "upscaler"]


def test_generate_equals_the_library(client, lib):
    resp = client.images.generate(model="lcm", prompt="a red fox", n=2, size="64x64", response_format="b64_json",
                                  extra_body={"seed": 3, "num_inference_steps": 3, "guidance_scale": 6.0})
    want = _library(lib["lcm"], "a red fox", 3, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=6.0,
                    height=64, width=64)
    got = _arrays(resp)
    assert len(got) == 2 and resp.size == "64x64"
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)  # one request alone: the very same pixels
    assert resp.model_extra["latentrt"]["seed"] == 3


# each: (model, prompt, n, extra_body); LCM batches mix guidance (it enters per image), SD runs CFG with
# negative prompts and an ancestral sampler (per-step noise from every request's own generator)
BATCHES = {
    "lcm": [("a cat", 1, {"seed": 1, "guidance_scale": 4.0}), ("a dog", 2, {"seed": 2, "guidance_scale": 8.0}),
            ("a boat", 1, {"seed": 3, "guidance_scale": 8.0})],
    "sd": [("a cat", 1, {"seed": 5, "negative_prompt": "blurry"}), ("a dog", 1, {"seed": 6}),
           ("a boat", 2, {"seed": 7, "negative_prompt": "dark"})],
}


@pytest.mark.parametrize("model", sorted(BATCHES))
def test_batched_requests_equal_one_at_a_time(model, client, lib):
    common = {"num_inference_steps": 3, "guidance_scale": 7.0, "scheduler": "EulerAncestralDiscreteScheduler"} \
        if model == "sd" else {"num_inference_steps": 2}
    jobs = BATCHES[model]

    def send(job):
        prompt, n, extra = job
        return client.images.generate(model=model, prompt=prompt, n=n, size="64x64", extra_body={**common, **extra})

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    assert max(r.model_extra["latentrt"]["batch_images"] for r in responses) == 4  # they did share one call
    worst = 0
    for (prompt, n, extra), resp in zip(jobs, responses):
        kw = {**common, **extra}
        seed = kw.pop("seed")
        want = _library(lib[model], prompt, seed, num_images_per_prompt=n, height=64, width=64, **kw)
        got = _arrays(resp)
        assert len(got) == n
        worst = max([worst] + [_max_diff(g, w) for g, w in zip(got, want)])
    assert worst <= 1, f"a batched image is {worst} levels from the one-at-a-time image"


def test_edit_image_to_image_equals_the_library(client, lib, photo):
    def send(seed):
        return client.images.edit(model="lcm", image=("in.png", png_bytes(photo), "image/png"), prompt="a painting",
                                  extra_body={"seed": seed, "strength": 0.6, "num_inference_steps": 3})

    with ThreadPoolExecutor(2) as pool:  # two edits of the same size: batched, each encoded with its seed
        responses = list(pool.map(send, [8, 9]))
    assert responses[0].model_extra["latentrt"]["batch_images"] == 2
    for seed, resp in zip([8, 9], responses):
        want = _library(lib["lcm"], "a painting", seed, image=photo, strength=0.6, num_inference_steps=3)
        assert _max_diff(_arrays(resp)[0], want[0]) <= 1


def test_edit_with_the_upscaler(client, lib, photo):
    resp = client.images.edit(model="upscaler", image=("in.png", png_bytes(photo), "image/png"), prompt="sharp",
                              extra_body={"seed": 4, "num_inference_steps": 2})
    want = _library(lib["upscaler"], "sharp", 4, image=photo, num_inference_steps=2)
    got = _arrays(resp)[0]
    assert got.shape == (128, 128, 3)
    np.testing.assert_array_equal(got, want[0])


def test_streaming_sends_partial_images_then_the_final_image(client, lib):
    kw = dict(model="lcm", prompt="a lighthouse", size="64x64",
              extra_body={"seed": 12, "num_inference_steps": 4})
    events = list(client.images.generate(stream=True, partial_images=2, **kw))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert isinstance(events[0], openai.types.ImageGenPartialImageEvent)
    assert png_array(events[0].b64_json).shape == (8, 8, 3)  # a latent-grid preview: cheap
    assert not np.array_equal(png_array(events[0].b64_json), png_array(events[1].b64_json))
    want = _library(lib["lcm"], "a lighthouse", 12, num_inference_steps=4, height=64, width=64)
    np.testing.assert_array_equal(png_array(events[-1].b64_json), want[0])


def test_streaming_edit_events(client, photo):
    events = list(client.images.edit(model="lcm", image=("in.png", png_bytes(photo), "image/png"), prompt="x",
                                     stream=True, partial_images=1,
                                     extra_body={"seed": 1, "strength": 1.0, "num_inference_steps": 4}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_errors_reach_the_client_as_4xx(client, photo):
    with pytest.raises(openai.BadRequestError, match="not a multiple of 8"):
        client.images.generate(model="lcm", prompt="x", size="65x64")
    with pytest.raises(openai.NotFoundError, match="not loaded"):
        client.images.generate(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="does not decode"):
        client.images.edit(model="lcm", image=("in.png", b"not a png", "image/png"), prompt="x")
    with pytest.raises(openai.BadRequestError, match="strength"):
        client.images.edit(model="lcm", image=("in.png", png_bytes(photo), "image/png"), prompt="x",
                           extra_body={"strength": 1.5})
    with pytest.raises(openai.APIStatusError, match="response_format") as e:
        client.images.generate(model="lcm", prompt="x", response_format="url")
    assert e.value.status_code == 501
