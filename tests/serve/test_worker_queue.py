"""The worker's queue bound (``--max-queue``): full means full of live jobs. A job whose client went away
or whose deadline passed holds no room, even before the worker thread next looks at its queue (the
Ray replica's ``max_ongoing_requests`` relies on this: Serve frees a cancelled request's slot at once)."""

from __future__ import annotations

import time

import pytest

import latentrt
from latentrt.serve.errors import QueueFull
from latentrt.serve.worker import Job, Worker


@pytest.fixture(scope="module")
def lcm_pipe(lcm_bundle):
    return latentrt.load(lcm_bundle)


def _job(seed: int, **kw) -> Job:
    return Job(prompt=f"a cat {seed}", seed=seed, params={"num_inference_steps": 1, "height": 64, "width": 64}, **kw)


def test_a_full_queue_refuses_and_a_cancelled_job_frees_its_room(lcm_pipe):
    worker = Worker("q", lcm_pipe, max_queue=2)  # not started: nothing leaves the queue by running
    first, second = _job(1), _job(2)
    worker.submit(first), worker.submit(second)
    with pytest.raises(QueueFull, match="the queue is full"):
        worker.submit(_job(3))
    first.cancel()
    third = _job(3)
    worker.submit(third)  # the cancelled job's room
    assert worker.queued == 2 and first.done and not third.done
    with pytest.raises(Exception, match="closed the connection"):
        first.future.result(timeout=0)


def test_an_expired_job_frees_its_room(lcm_pipe):
    worker = Worker("q", lcm_pipe, max_queue=1)
    old = _job(1, timeout_s=0.05)
    worker.submit(old)
    with pytest.raises(QueueFull):
        worker.submit(_job(2))
    time.sleep(0.1)
    worker.submit(_job(2))
    assert worker.queued == 1 and old.done
    with pytest.raises(Exception, match="deadline"):
        old.future.result(timeout=0)
