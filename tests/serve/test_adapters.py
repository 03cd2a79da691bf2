"""The pure parts of the server: API adapters (request -> job, error -> status) and the batch noise."""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.serve import api_a1111, api_openai
from latentrt.serve.errors import BadRequest, NotSupported, QueueFull, status_of
from latentrt.serve.worker import GroupNoise


def test_group_noise_gives_each_job_its_own_generators_draws():
    a, b = np.random.default_rng(1), np.random.default_rng(2)
    noise = GroupNoise([(np.random.default_rng(1), 1), (np.random.default_rng(2), 2)])
    for shape in ((3, 4, 2, 2), (3, 1)):  # two draws in a row, as a pipeline makes them
        got = noise.standard_normal(shape, dtype=np.float32)
        want = np.concatenate([a.standard_normal((1,) + shape[1:], dtype=np.float32),
                               b.standard_normal((2,) + shape[1:], dtype=np.float32)])
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="does not split"):
        noise.standard_normal((2, 4))


@pytest.mark.parametrize("steps, partials, want", [(4, 2, [1, 3]), (4, 3, [1, 2, 3]), (8, 1, [4]), (1, 3, []),
                                                   (4, 0, []), (2, 3, [1])])
def test_partial_steps(steps, partials, want):
    assert api_openai.partial_steps(steps, partials) == want


def test_openai_generation_call():
    call = api_openai.generation_call({"model": "m", "prompt": "p", "n": 2, "size": "96x64", "seed": 5,
                                       "num_inference_steps": 3, "guidance_scale": 2, "negative_prompt": "q"})
    assert call.model == "m" and call.job.n == 2 and call.job.seed == 5 and call.job.negative_prompt == "q"
    assert call.job.params == {"width": 96, "height": 64, "num_inference_steps": 3, "guidance_scale": 2.0}
    form = api_openai._common({"prompt": "p", "n": "2", "stream": "true", "strength": "0.5"}, edit=True)
    assert form[0]["n"] == 2 and form[0]["params"] == {"strength": 0.5} and form[1]["stream"] is True
    for body, words in (({"prompt": "p", "size": "big"}, "WIDTHxHEIGHT"), ({"prompt": ""}, "prompt is required"),
                        ({"prompt": "p", "n": 1.5}, "integer"), ({"prompt": "p", "seed": True}, "number")):
        with pytest.raises(BadRequest, match=words):
            api_openai.generation_call(body)
    with pytest.raises(NotSupported):
        api_openai.generation_call({"prompt": "p", "background": "transparent"})


def test_a1111_samplers():
    known = ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler+karras"]
    assert api_a1111.scheduler_name("Euler a", None, known) == "EulerAncestralDiscreteScheduler"
    assert api_a1111.scheduler_name("DPM++ 2M", "Karras", known) == "DPMSolverMultistepScheduler+karras"
    assert api_a1111.scheduler_name("DPM++ 2M Karras", None, known) == "DPMSolverMultistepScheduler+karras"
    assert api_a1111.scheduler_name(None, None, known) is None
    with pytest.raises(BadRequest, match="not available"):
        api_a1111.scheduler_name("Heun", None, known)
    job = api_a1111.job({"prompt": "p", "seed": -1, "steps": 2, "batch_size": 2, "n_iter": 2}, img2img=False)
    assert job.n == 4 and job.seed >= 0 and job.params == {"num_inference_steps": 2}


def test_error_statuses():
    assert status_of(ValueError("bad size")) == (400, "invalid_request")
    assert status_of(QueueFull("full", retry_after=3)) == (429, "queue_full")
    assert status_of(RuntimeError("engine")) == (500, "server_error")
    status, body = api_openai.error_body(RuntimeError("secret path /x"))
    assert status == 500 and "secret" not in body["error"]["message"]  # no internals in a 500
    assert api_a1111.error_body(NotSupported("enable_hr"))[1] == {"error": "not_supported", "detail": "enable_hr"}
