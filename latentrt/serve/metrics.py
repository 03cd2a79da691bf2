"""Prometheus metrics of the server (``GET /metrics``): requests by route and status, queue depth,
batch sizes, per-stage latency, and how soon a cancelled request's work stopped.

Each app gets its own registry, so several apps (tests) in one process never clash.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

from .worker import Observer

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics(Observer):
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("latentrt_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("latentrt_request_seconds", "request latency", ["route"], buckets=_SECONDS, registry=r)
        self.queue = Gauge("latentrt_queue_depth", "requests waiting per model", ["model"], registry=r)
        self.batch_images = Histogram("latentrt_batch_images", "images per pipeline call", ["model"],
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.batch_seconds = Histogram("latentrt_batch_seconds", "wall time of a pipeline call", ["model"],
                                       buckets=_SECONDS, registry=r)
        self.stage = Histogram("latentrt_stage_seconds", "per-stage latency (text encoder, each UNet step, VAE)",
                               ["model", "stage"], buckets=_SECONDS, registry=r)
        self.cancel_steps = Histogram("latentrt_cancel_steps_after", "denoising steps a cancelled request's batch "
                                      "ran after the cancel", ["model"], buckets=(0, 1, 2, 4, 8), registry=r)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    # Observer hooks (called from the worker threads)
    def queue_depth(self, model: str, depth: int) -> None:
        self.queue.labels(model).set(depth)

    def batch(self, model: str, images: int, seconds: float, timings: dict[str, list[float]]) -> None:
        self.batch_images.labels(model).observe(images)
        self.batch_seconds.labels(model).observe(seconds)
        for stage, values in timings.items():
            for v in values:
                self.stage.labels(model, stage).observe(v)

    def cancelled(self, model: str, steps_after: int, seconds: float) -> None:
        self.cancel_steps.labels(model).observe(steps_after)

    def render(self) -> bytes:
        return generate_latest(self.registry)
