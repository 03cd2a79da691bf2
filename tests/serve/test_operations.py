"""Operations of the real server: bad input, API key, overload (429), deadlines, cancellation on
disconnect, graceful shutdown, health / readiness / metrics."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from serve_helpers import ServerProcess, png_array

import latentrt

#: a request slow enough to act on while it runs (tiny LCM at 256x256: 0.06-0.2 s a step here)
SLOW = {"prompt": "a slow one", "size": "256x256", "num_inference_steps": 30}
#: one that runs far past the strict server's 2 s deadline anywhere (4 images at 256x256, the tiny bundle's
#: largest size: 0.2-0.7 s a step here)
SLOWER = {"prompt": "a slower one", "size": "256x256", "num_inference_steps": 50, "n": 4}


def _post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=kw.pop("timeout", 120), **kw)


def _wait(predicate, timeout_s=30.0, what="condition"):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _running_step(url, headers=None) -> int:
    r = httpx.get(url + "/sdapi/v1/progress?skip_current_image=true", headers=headers, timeout=10)
    return r.json()["state"]["sampling_step"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "x", "n": 0}, 400, "n (images per request)"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps must be a positive integer"),
    ({"prompt": "x", "num_inference_steps": "four"}, 400, "must be an integer"),
    ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale must be a number"),
    ({"prompt": "x", "seed": -5}, 400, "seed must be >= 0"),
    ({"prompt": "x", "size": "big"}, 400, "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "68x64"}, 400, "multiple of 8"),
    ({"prompt": "x", "size": "512x512"}, 400, "above the sizes this bundle supports"),
    ({"prompt": "x", "scheduler": "FancyScheduler"}, 400, "unknown scheduler"),
    ({"prompt": "x", "stream": True, "partial_images": 5}, 400, "partial_images"),
    ({"n": 1}, 400, "prompt is required"),
    ({"prompt": "x", "model": "sdxl"}, 404, "not loaded"),
    ({"prompt": "x" * (2 << 20)}, 413, "byte limit"),
])
def test_bad_input_is_a_clear_4xx(server, body, status, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/images/generations", timeout=60, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_bad_uploads(server):
    r = httpx.post(server.url + "/v1/images/edits", data={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and "exactly one image" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/images/edits", data={"prompt": "x"}, timeout=60,
                   files={"image": ("a.png", b"\x89PNG broken", "image/png")})
    assert r.status_code == 400 and "does not decode" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/images/edits", data={"prompt": "x"}, timeout=60,
                   files={"image": ("a.png", b"0" * (2 << 20), "image/png")})
    assert r.status_code == 413


def test_server_stays_healthy_and_counts_requests(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["ready"] is True
    r = _post(server.url, "/v1/images/generations", {"prompt": "fine", "size": "64x64"})
    assert r.status_code == 200
    assert server.metric("latentrt_requests_total", route="/v1/images/generations", status="200") >= 1
    assert server.metric("latentrt_requests_total", status="500") == 0  # nothing above ever was a 500
    assert server.metric("latentrt_batch_images_count", model="lcm") >= 1
    assert server.metric("latentrt_stage_seconds_count", model="lcm", stage="unet") >= 1
    assert "latentrt_queue_depth" in httpx.get(server.url + "/metrics").text


def test_api_key(strict_server):
    url = strict_server.url
    assert httpx.get(url + "/v1/models").status_code == 401
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    assert httpx.get(url + "/sdapi/v1/sd-models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # liveness and the page need no key
    assert httpx.get(url + "/").status_code == 200


AUTH = {"Authorization": "Bearer sekrit"}


def test_overload_answers_429_with_retry_after(strict_server, lcm_bundle):
    """One running, one queued (--max-queue 1): the rest are told to come back later."""
    body = {"prompt": "busy", "size": "256x256", "num_inference_steps": 2, "seed": 4}
    results = [None] * 6

    def send(k):
        results[k] = _post(strict_server.url, "/v1/images/generations", body, headers=AUTH)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.status_code for r in results)
    assert codes.count(429) >= 2 and codes.count(200) >= 1 and set(codes) <= {200, 429}, codes
    want = np.asarray(latentrt.load(lcm_bundle)("busy", height=256, width=256, num_inference_steps=2,
                                                generator=4).images[0])
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]["message"]
        else:  # every accepted request got its own, correct image
            np.testing.assert_array_equal(png_array(r.json()["data"][0]["b64_json"]), want)


def test_deadline_cancels_between_steps(strict_server):
    t0 = time.monotonic()
    r = _post(strict_server.url, "/v1/images/generations", SLOWER, headers=AUTH)
    assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 2 + 3  # the 2 s deadline and at most a step, not the whole run
    _wait(lambda: _running_step(strict_server.url, AUTH) == 0, what="the worker to go idle")


def _send_raw(url: str, body: dict) -> socket.socket:
    """POST without reading the answer: the test closes the socket to disconnect."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_disconnect_cancels_within_one_step_and_batch_mates_go_on(server, lcm_bundle):
    url = server.url
    before = server.metric("latentrt_cancel_steps_after_count", model="lcm")
    mate = {}

    def batch_mate():
        mate["r"] = _post(url, "/v1/images/generations", {**SLOW, "prompt": "the mate", "seed": 31, "model": "lcm"})

    sock = _send_raw(url, {**SLOW, "seed": 30, "model": "lcm"})
    t = threading.Thread(target=batch_mate)
    t.start()
    _wait(lambda: _running_step(url) >= 2, what="the batch to run two steps")
    sock.close()  # the client goes away mid-run
    _wait(lambda: server.metric("latentrt_cancel_steps_after_count", model="lcm") == before + 1,
          what="the cancel to be recorded")
    # the cancelled request's batch ran at most one more step after the cancel
    assert server.metric("latentrt_cancel_steps_after_bucket", model="lcm", le="1.0") == before + 1
    t.join(120)
    assert mate["r"].status_code == 200, mate["r"].text
    want = latentrt.load(lcm_bundle)("the mate", height=256, width=256, num_inference_steps=30, generator=31).images[0]
    np.testing.assert_array_equal(png_array(mate["r"].json()["data"][0]["b64_json"]), np.asarray(want))


def test_sigterm_drains_in_flight_work_and_refuses_new_work(lcm_bundle):
    s = ServerProcess(f"lcm={lcm_bundle}", "--no-warmup")
    try:
        inflight = {}
        t = threading.Thread(target=lambda: inflight.setdefault("r", _post(s.url, "/v1/images/generations", SLOW)))
        t.start()
        _wait(lambda: _running_step(s.url) >= 1, what="the request to start")
        progress = httpx.get(s.url + "/sdapi/v1/progress").json()  # A1111 progress with a live preview
        assert 0 < progress["progress"] < 1 and png_array(progress["current_image"]).shape == (32, 32, 3)
        s.proc.send_signal(15)
        _wait(lambda: httpx.get(s.url + "/ready").status_code == 503, what="/ready to say draining")
        r = _post(s.url, "/v1/images/generations", {"prompt": "too late", "size": "64x64"})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        t.join(120)
        assert inflight["r"].status_code == 200  # the in-flight request finished
        assert s.proc.wait(60) == 0
    finally:
        s.kill()


def test_a1111_interrupt_stops_the_running_request(server):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", _post(server.url, "/sdapi/v1/txt2img", {
        "prompt": "interrupt me", "width": 256, "height": 256, "steps": 30})))
    t.start()
    _wait(lambda: _running_step(server.url) >= 1, what="the request to start")
    assert httpx.post(server.url + "/sdapi/v1/interrupt").json()["interrupted"] == 1
    t.join(60)
    assert out["r"].status_code == 409 and "interrupted" in out["r"].json()["detail"]
    _wait(lambda: _running_step(server.url) == 0, what="the worker to go idle")


def test_a_stream_whose_client_leaves_is_cancelled(server):
    before = server.metric("latentrt_cancel_steps_after_count", model="lcm")
    sock = _send_raw(server.url, {**SLOW, "seed": 40, "model": "lcm", "stream": True, "partial_images": 3})
    seen = b""
    while b"image_generation.partial_image" not in seen:  # the first preview arrived: the run is under way
        chunk = sock.recv(65536)
        assert chunk, "the stream ended before its first preview"
        seen += chunk
    sock.close()
    _wait(lambda: server.metric("latentrt_cancel_steps_after_count", model="lcm") == before + 1,
          what="the stream's cancel to be recorded")
    _wait(lambda: _running_step(server.url) == 0, what="the worker to go idle")
