"""Liveness: a worker thread that crashed (not one that was stopped) turns ``/health`` into a 503, which is
what a Kubernetes liveness probe and the Ray replica's health check act on."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import latentrt
from latentrt.serve.app import Server, create_app
from latentrt.serve.worker import Worker


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_a_crashed_worker_fails_health_and_a_stopped_one_does_not(lcm_bundle):
    pipe = latentrt.load(lcm_bundle)
    crashing, stopped = Worker("crashing", pipe), Worker("stopped", pipe)

    def crash():
        raise MemoryError("the batching thread ran out of memory")  # what _run's error handling cannot absorb

    crashing._take_batch = crash
    server = Server({"crashing": crashing, "stopped": stopped})
    client = TestClient(create_app(server))
    assert not crashing.died() and client.get("/health").status_code == 200  # not started yet: not dead
    stopped.start().stop()
    assert not stopped.died() and client.get("/health").json() == {"status": "ok"}
    crashing.start()
    crashing._thread.join(timeout=10)
    assert crashing.died()
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "dead", "dead_workers": ["crashing"]}
