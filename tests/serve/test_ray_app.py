"""``latentrt.serve.ray_app`` on a local Ray instance: two replicas of the tiny LCM bundle behind Serve's
HTTP proxy on 127.0.0.1, checked through HTTP (the ``openai`` client, load spread, backpressure, a replica
killed mid-load). One deployment for the module: Ray's start-up is the slow part."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_helpers import free_port, png_array

import latentrt

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'latentrt[ray]')")
serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'latentrt[ray]')")

APP = "latentrt"
# each replica holds max_queue = 2 requests (running or waiting); the proxy queues 8 more (Serve counts a request as
# queued until a replica takes it, so a burst needs room there)
OPTIONS = dict(replicas=2, num_cpus=1, threads=1, max_batch=2, batch_wait_ms=30, max_queue=2,
               max_queued_requests=8, retry_after_s=2, health_check_period_s=1)


@pytest.fixture(scope="module")
def cluster(lcm_bundle):
    from latentrt.serve.ray_app import ray_app

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app({"lcm": str(lcm_bundle)}, **OPTIONS), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _generate(url: str, seed: int, steps: int = 2, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", timeout=timeout,
                      json={"model": "lcm", "prompt": f"a cat {seed}", "size": "64x64", "seed": seed,
                            "num_inference_steps": steps})


def _replica_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and APP in a["name"]]


def test_openai_client_gets_the_library_images(cluster, lcm_bundle):
    import openai

    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["lcm"]
    resp = client.images.generate(model="lcm", prompt="a red fox", n=2, size="64x64", response_format="b64_json",
                                  extra_body={"seed": 3, "num_inference_steps": 3, "guidance_scale": 6.0})
    want = latentrt.load(lcm_bundle, threads=1)("a red fox", generator=3, num_images_per_prompt=2,
                                                num_inference_steps=3, guidance_scale=6.0, height=64, width=64,
                                                output_type="pil").images
    got = [png_array(d.b64_json) for d in resp.data]
    assert len(got) == 2
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.asarray(w))


def test_load_spreads_over_both_replicas(cluster):
    with ThreadPoolExecutor(4) as pool:  # within the room of the two replicas
        answers = list(pool.map(lambda s: _generate(cluster, s, steps=4), range(12)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    seen = [r.headers["x-latentrt-replica"] for r in answers]
    assert len(set(seen)) == 2, f"every answer came from one replica: {seen}"


def test_a_full_cluster_answers_429_with_retry_after(cluster):
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda s: _generate(cluster, s, steps=8), range(32)))
    codes = [r.status_code for r in answers]
    refused = [r for r in answers if r.status_code in (429, 503)]
    assert refused, f"32 requests at once on room for 12 were all accepted: {codes}"
    assert all(r.headers.get("retry-after") for r in refused), [dict(r.headers) for r in refused]
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) >= 2, codes


def test_a_killed_replica_loses_no_request_and_is_replaced(cluster):
    before = set(_replica_actors())
    assert len(before) == 2, before
    victim = sorted(before)[0]

    def one(seed):
        try:
            return _generate(cluster, seed, steps=6, timeout=90).status_code
        except httpx.HTTPError as e:  # a hang or a dropped connection is what this test forbids
            return repr(e)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, s) for s in range(16)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        codes = [f.result() for f in futures]
    assert all(c == 200 or (isinstance(c, int) and c >= 500) or c == 429 for c in codes), codes
    assert codes.count(200) >= 8, codes  # the live replica kept serving

    end, seen = time.monotonic() + 90, set()  # Serve replaces the dead replica; both answer again
    old = {name.split("#")[-1] for name in before}
    while time.monotonic() < end and not (seen - old and seen & old):
        try:
            r = _generate(cluster, 0, steps=1, timeout=10)
            if r.status_code == 200:
                seen.add(r.headers["x-latentrt-replica"])
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert seen - old and seen & old, f"the killed replica was not replaced: answers came from {seen}, first {old}"
    assert victim.split("#")[-1] not in seen
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda s: _generate(cluster, s, steps=4), range(8)))
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers if r.status_code != 200]


def test_multiplexed_replica_keeps_at_most_k_models(cluster, lcm_bundle, sd_serve_bundle):
    from latentrt.serve.ray_app import ray_app

    app = ray_app({"lcm": str(lcm_bundle), "sd": str(sd_serve_bundle)}, multiplex=1, num_cpus=0, threads=1,
                  name="Multiplexed")
    serve.run(app, name="multi", route_prefix="/multi")
    url = cluster + "/multi"
    try:
        for model in ("lcm", "sd", "lcm"):
            r = httpx.post(url + "/v1/images/generations", timeout=120,
                           json={"model": model, "prompt": "a cat", "size": "64x64", "seed": 1,
                                 "num_inference_steps": 2})
            assert r.status_code == 200, r.text
            loaded = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
            assert loaded == [model], f"after a request for {model} the replica holds {loaded}"
        r = httpx.post(url + "/v1/images/generations", timeout=30, json={"model": "nope", "prompt": "a cat"})
        assert r.status_code == 404, r.text
    finally:
        serve.delete("multi")


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2", "--autoscale", "1,2"], "not both"),
    (["--autoscale", "4"], "MIN,MAX"),
    (["--autoscale", "3,1"], "0 <= MIN <= MAX"),
])
def test_cli_refuses_bad_scaling_options_before_starting_ray(lcm_bundle, flags, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "latentrt.cli", "serve", str(lcm_bundle), "--ray", *flags],
                       capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
