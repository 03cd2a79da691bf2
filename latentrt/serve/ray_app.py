"""``latentrt serve --ray``: the same server as replicas of a Ray Serve deployment (the ``ray`` extra).

Each replica is the single-machine server: :func:`~latentrt.serve.app.load_server` builds its workers
(batching, queue, deadlines, error mapping) and :func:`~latentrt.serve.app.create_app` its routes, served
through Serve's FastAPI ingress. Ray adds what one machine cannot: replicas on many machines, routing
to free replicas, autoscaling, and backpressure in front of the replicas. This is the only module that
imports Ray.

* **Backpressure.** A replica takes at most ``max_queue`` requests per model at once
  (``max_ongoing_requests``). Every request Serve counts as ongoing on a replica is either waiting in
  its worker's queue or running, so the queue (which refuses past ``max_queue`` waiting) cannot
  overflow, not even in the moment between a batch's answers going out and the worker taking its
  next batch. A single-model replica therefore never answers 429 itself while another has room (a
  multiplexed one can, if all its requests name one model); past that, up to ``max_queued_requests``
  wait at each proxy and the rest get 429 with ``Retry-After`` from Serve itself. A full cluster
  answers, it never queues without bound.
* **Warm-up.** A replica's constructor waits for its one-step warm-up calls, so Serve sends it no traffic
  before it is ready; its health check fails (and Serve replaces it) if a worker's thread has died.
* **Models.** A replica loads every bundle, or with ``multiplex=K`` loads on demand the model a request
  names (the ``model`` field, or the header ``serve_multiplexed_model_id``, which Serve also routes by)
  and keeps the ``K`` most recently used (``serve.multiplexed``'s LRU).
* **Faults.** A replica that dies is replaced by Serve; the requests it held fail with a 5xx from Serve's
  proxy, the rest are routed to the live replicas.

Every answer carries ``X-Latentrt-Replica`` (the Serve replica id), so load spread can be observed.

Use it from Python (``serve.run(ray_app({"lcm": "bundles/lcm"}, replicas=2))``), from the CLI
(``latentrt serve BUNDLE --ray --replicas 2``) or from a Serve config file (``serve run config.yaml``)
whose ``import_path`` is ``latentrt.serve.ray_app:build`` and whose ``args`` are :func:`ray_app`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from .app import create_app, load_server

logger = logging.getLogger("latentrt.serve")
REPLICA_HEADER = "x-latentrt-replica"
MODEL_HEADER = "serve_multiplexed_model_id"


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (a unit test of the class)
        return "local"


class _Tagged:
    """ASGI middleware: every answer names the replica that gave it."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]}
            await send(message)

        return await self.app(scope, receive, tagged if scope["type"] == "http" else send)


class _ModelOnDemand:
    """ASGI middleware (multiplexed replicas): load the model a request names before its route runs.

    The name comes from the Serve routing header, else the JSON body's ``model`` (OpenAI) or
    ``override_settings.sd_model_checkpoint`` (A1111), else the server's current model; names this
    deployment does not serve pass through (the route answers 404)."""

    def __init__(self, app, ensure, known, current):
        self.app, self.ensure, self.known, self.current = app, ensure, known, current

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        chunks, more = [], True
        while more:  # buffer the body (the app's own size limit still applies), then replay it
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message)
            more = message.get("more_body", False)
        name = headers.get(MODEL_HEADER) or _model_in(b"".join(m.get("body", b"") for m in chunks)) or self.current()
        if name in self.known:
            await self.ensure(name)
        await self.app(scope, _replay(chunks, receive), send)


def _replay(messages: list, then=None):
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive


def _model_in(body: bytes) -> str | None:
    try:
        data = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # multipart (an edit) or bad JSON: the route says what is wrong
    if not isinstance(data, dict):
        return None
    settings = data.get("override_settings")
    name = data.get("model") or (settings.get("sd_model_checkpoint") if isinstance(settings, dict) else None)
    return name if isinstance(name, str) else None


@serve.ingress()
class LatentrtReplica:
    """One replica: the single-machine server's workers and routes (see the module docstring)."""

    async def __init__(self, bundles: dict[str, str], server_options: dict, multiplex: int = 0):
        self.bundles = {name: str(path) for name, path in bundles.items()}
        self.options, self.multiplex = dict(server_options), int(multiplex)
        self.replica = _replica_id()
        first = next(iter(self.bundles))
        loaded = self.bundles if not self.multiplex else {first: self.bundles[first]}
        self.server = load_server(loaded, **self.options)
        while not self.server.ready:  # warm-up before Serve routes traffic here
            await asyncio.sleep(0.05)
            self._check_workers()
        if self.multiplex:
            self.server.current = first
            async def load(name: str) -> _Loaded:  # a plain function: serve.multiplexed keeps its LRU on it
                return await self._load_model(name)

            self._lru = serve.multiplexed(max_num_models_per_replica=self.multiplex)(load)
            await self._lru(first)  # the first model counts towards the bound like any other
        logger.info("replica %s ready: %s", self.replica, ", ".join(self.server.workers))

    def __serve_build_asgi_app__(self):
        app = create_app(self.server)
        if self.multiplex:
            app = _ModelOnDemand(app, self._lru, self.bundles, lambda: self.server.current)
        return _Tagged(app, self.replica)

    async def _load_model(self, name: str) -> "_Loaded":
        if name not in self.server.workers:
            await asyncio.to_thread(self._load_now, name)
        return _Loaded(self.server, name)

    def _load_now(self, name: str) -> None:
        loaded = load_server({name: self.bundles[name]}, **self.options)  # loads and warms up one model
        while not loaded.ready:
            time.sleep(0.05)
        worker = loaded.workers[name]
        worker.observer = self.server.metrics
        self.server.workers[name] = worker

    def _check_workers(self) -> None:
        dead = [name for name, w in self.server.workers.items() if w.died()]
        if dead:
            raise RuntimeError(f"the worker thread of {dead} died on replica {self.replica}")

    def check_health(self) -> None:
        """Serve's health check: a replica whose worker thread died is replaced."""
        self._check_workers()


class _Loaded:
    """A multiplexed model held by Serve's LRU; evicting it stops its worker and unloads it."""

    def __init__(self, server, name: str):
        self.server, self.name = server, name

    def __del__(self):
        worker = self.server.workers.pop(self.name, None)
        if worker is not None:  # requests it holds finish, then its thread ends
            worker.drain()
            threading.Thread(target=lambda: (worker.wait_idle(60), worker.stop()), daemon=True).start()


def ray_app(bundles: dict[str, Any] | list, *, replicas: int = 1, autoscale: tuple[int, int] | None = None,
            num_cpus: float = 1.0, num_gpus: float = 0.0, threads: int | None = None, multiplex: int = 0,
            max_queued_requests: int = 64, retry_after_s: float = 1.0, name: str = "LatentrtReplica",
            backend: str = "onnxruntime", device: str = "cpu", engine_options: dict | None = None,
            max_batch: int = 4, batch_wait_ms: float = 20.0, max_queue: int = 32, timeout_s: float | None = 300.0,
            api_key: str | None = None, max_body_bytes: int = 20 << 20, warmup: bool = True,
            health_check_period_s: float = 10.0, safety_checker: bool | None = None):
    """A Ray Serve application serving ``bundles`` (``{name: path}``, or paths named by their folders)
    with the routes of ``latentrt serve``; pass it to ``serve.run``.

    ``replicas`` fixed replicas, or ``autoscale=(min, max)`` (min may be 0); each replica reserves
    ``num_cpus`` / ``num_gpus`` and runs its engines with ``threads`` intra-op threads (default: its
    ``num_cpus``). ``multiplex=K`` loads models on demand, at most ``K`` per replica; 0 loads all.
    ``max_queued_requests`` wait at each proxy once every replica is full; past them Serve answers 429
    with ``Retry-After: retry_after_s``. The rest are the single-machine server's settings
    (``safety_checker``: None runs each bundle's checker if it has one, True requires one, False none)."""
    if isinstance(bundles, (list, tuple)):
        bundles = {Path(p).resolve().name: p for p in bundles}
    if not bundles:
        raise ValueError("serve at least one bundle")
    missing = [str(p) for p in bundles.values() if not Path(p).is_dir()]
    if missing:
        raise ValueError(f"no bundle folder at {missing}: export one with 'latentrt export' or fix the path")
    if autoscale is not None:
        low, high = (int(v) for v in autoscale)
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {low},{high}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if multiplex < 0:
        raise ValueError(f"multiplex must be 0 (load every bundle) or the most models per replica, got {multiplex}")
    threads = threads or max(1, int(num_cpus))
    server_options = dict(backend=backend, device=device, engine_options={"threads": threads, **(engine_options or {})},
                          max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue, timeout_s=timeout_s,
                          api_key=api_key, max_body_bytes=max_body_bytes, warmup=warmup, safety_checker=safety_checker)
    per_replica = max(1, max_queue) * (min(len(bundles), multiplex) if multiplex else len(bundles))
    scaling = (dict(autoscaling_config=AutoscalingConfig(min_replicas=low, max_replicas=high,
                                                         target_ongoing_requests=max(1, max_batch)))
               if autoscale is not None else dict(num_replicas=int(replicas)))
    deployment = serve.deployment(LatentrtReplica).options(
        name=name, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=per_replica, max_queued_requests=int(max_queued_requests),
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=retry_after_s),
        health_check_period_s=health_check_period_s, **scaling)
    return deployment.bind({k: str(v) for k, v in bundles.items()}, server_options, int(multiplex))


def build(args: dict):
    """Application builder for Serve config files: ``import_path: latentrt.serve.ray_app:build`` with
    ``args`` holding :func:`ray_app`'s keyword arguments (``bundles`` among them)."""
    args = dict(args)
    try:
        bundles = args.pop("bundles")
    except KeyError:
        raise ValueError("the Serve config's args need 'bundles': {name: bundle path}") from None
    if "autoscale" in args and args["autoscale"] is not None:
        args["autoscale"] = tuple(args["autoscale"])
    return ray_app(bundles, **args)


class _CallableModule(types.ModuleType):
    """``latentrt.serve.ray_app(bundles, ...)`` calls :func:`ray_app` (the module is named for it)."""

    def __call__(self, *args, **kwargs):
        return ray_app(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
