"""``latentrt serve BUNDLE --ray``: the command line path end to end (a local Ray instance started by the
command, one replica of the tiny LCM bundle), through HTTP: the library's image for the seed, the bad-input
4xx of the single-machine server, a clean exit on SIGTERM; and the CLI's own argument checks."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
from serve_helpers import ServerProcess, png_array

import latentrt

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'latentrt[ray]')")


def test_serve_ray_command_serves_the_library_images_and_stops_cleanly(lcm_bundle):
    s = ServerProcess(f"lcm={lcm_bundle}", "--ray", "--replicas", "1", "--max-batch", "2",
                      "--safety-checker", "off", timeout_s=240)
    try:
        r = httpx.post(s.url + "/v1/images/generations", timeout=120,
                       json={"prompt": "a lighthouse", "size": "64x64", "seed": 11, "num_inference_steps": 2})
        assert r.status_code == 200, r.text
        got = png_array(r.json()["data"][0]["b64_json"])
        want = latentrt.load(lcm_bundle)("a lighthouse", height=64, width=64, num_inference_steps=2, generator=11,
                                         output_type="np").images[0]
        assert np.array_equal(got, np.round(want * 255).astype(np.uint8))
        bad = httpx.post(s.url + "/v1/images/generations", timeout=60, json={"prompt": "x", "size": "68x64"})
        assert bad.status_code == 400 and "multiple of 8" in bad.json()["error"]["message"]
        assert httpx.get(s.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "lcm"
    finally:
        rc = s.stop(timeout_s=90)
    assert rc == 0, s.output[-5000:]


@pytest.mark.parametrize("args, words", [
    (["--autoscale", "1"], "--autoscale takes MIN,MAX"),
    (["--autoscale", "1,2", "--replicas", "2"], "not both"),
])
def test_serve_ray_argument_errors(lcm_bundle, args, words):
    r = subprocess.run([sys.executable, "-m", "latentrt.cli", "serve", f"lcm={lcm_bundle}", "--ray", *args],
                       capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode != 0 and words in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
