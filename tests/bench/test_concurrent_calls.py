"""One pipeline object serves concurrent calls: each call keeps its own timings, VAE and images.

(Here, next to the TAESD fixtures, because the VAE choice is part of the per-call state.)
"""

from __future__ import annotations

import threading
import time

import numpy as np

import latentrt

#: (seed, steps, vae) per call; run all at once, twice over, from threads
CALLS = [(1, 1, "full"), (2, 3, "tiny"), (3, 2, "full"), (4, 4, "tiny")]


def _call(pipe, seed, steps, vae, on_step=None):
    return pipe("a cat", num_inference_steps=steps, generator=seed, output_type="np", vae=vae,
                callback_on_step_end=on_step)


def test_concurrent_calls_keep_their_own_state(taesd_bundle):
    pipe = latentrt.load(taesd_bundle)
    alone = {c: _call(pipe, *c).images for c in CALLS}
    jobs = CALLS * 2
    start = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def step(p, i, t, tensors):  # yield the engines to the other threads between steps
        time.sleep(0.005)
        return tensors

    def worker(k, c):
        try:
            start.wait()
            out = _call(pipe, *c, on_step=step)
            results[k] = (out, pipe.last_timings)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k, c)) for k, c in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for (seed, steps, vae), (out, last) in zip(jobs, results):
        np.testing.assert_array_equal(out.images, alone[(seed, steps, vae)])
        assert len(out.timings["unet"]) == steps  # its own steps only
        decoder, other = ("tiny_vae_decoder", "vae_decoder") if vae == "tiny" else ("vae_decoder", "tiny_vae_decoder")
        assert len(out.timings[decoder]) == 1 and other not in out.timings
        assert last == out.timings  # last_timings is the calling thread's last call
