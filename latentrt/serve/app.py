"""The FastAPI app: routes of both APIs, operations endpoints, the playground page.

:func:`create_app` takes already-built :class:`~latentrt.serve.worker.Worker` objects (one per
model), so any front end that builds workers (the CLI, a Ray Serve deployment) serves the same routes.
The routes only translate: the API modules turn requests into jobs and results into answers, the
workers batch and run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from .errors import BadRequest, BodyTooLarge, NotSupported, ServeError, Unauthorized, UnknownModel, status_of
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .worker import Job, Worker

logger = logging.getLogger("latentrt.serve")
STATIC = Path(__file__).parent / "static"
#: paths anyone may call without the API key
PUBLIC = ("/", "/health", "/ready")


class Server:
    """The state the routes share: models, the current A1111 model, readiness, draining."""

    def __init__(self, workers: dict[str, Worker], *, api_key: str | None = None, max_body_bytes: int = 20 << 20,
                 metrics: Metrics | None = None):
        if not workers:
            raise ValueError("serve at least one model")
        self.workers, self.api_key, self.max_body_bytes = dict(workers), api_key, int(max_body_bytes)
        self.metrics = metrics or Metrics()
        for w in self.workers.values():
            w.observer = self.metrics
        self.current = next(iter(self.workers))  # A1111's sd_model_checkpoint
        self.ready = False
        self.draining = False

    def worker(self, model: str | None) -> Worker:
        name = model or self.current
        if name not in self.workers:
            raise UnknownModel(f"model {name!r} is not loaded; this server has {sorted(self.workers)} (GET /v1/models)")
        return self.workers[name]

    def drain(self) -> None:
        """Refuse new work (503), finish what is queued and running."""
        self.draining = True
        for w in self.workers.values():
            w.drain()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        end = None if timeout_s is None else time.monotonic() + timeout_s
        return all(w.wait_idle(None if end is None else max(0.0, end - time.monotonic())) for w in self.workers.values())

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()


def load_server(bundles: dict[str, Any], *, backend: str = "onnxruntime", device: str = "cpu",
                engine_options: dict | None = None, max_batch: int = 4, batch_wait_ms: float = 20.0,
                max_queue: int = 32, timeout_s: float | None = None, api_key: str | None = None,
                max_body_bytes: int = 20 << 20, warmup: bool = True, safety_checker: bool | None = None) -> Server:
    """Load ``{name: bundle path}``, start a worker per model and warm them up in the background
    (``/ready`` answers 200 once done). What the CLI runs; a Ray Serve replica can run the same:
    ``serve.ingress(lambda: create_app(load_server(...)))``. ``safety_checker``: True runs every bundle's
    checker (a bundle without one is refused), False none, None each bundle's when it has one."""
    import threading

    from .. import load

    workers = {name: Worker(name, load(path, backend=backend, device=device, **(engine_options or {})),
                            max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue,
                            timeout_s=timeout_s, safety_checker=safety_checker)
               for name, path in bundles.items()}
    server = Server(workers, api_key=api_key, max_body_bytes=max_body_bytes)

    def start():
        for w in workers.values():
            w.start()
            if warmup:
                w.warm_up()
        server.ready = True
        logger.info("ready: %s", ", ".join(workers))

    threading.Thread(target=start, name="latentrt-warm-up", daemon=True).start()
    return server


class Gate:
    """ASGI middleware: API key, body size limit, request metrics (pure ASGI, so streaming
    responses and disconnect detection pass through untouched)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), [500]
        path = scope["path"]
        error_for = _error_response_for(path)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            key = self.server.api_key
            if key and path not in PUBLIC and headers.get("authorization") != f"Bearer {key}":
                raise Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                   "(the server's --api-key)")
            limit = self.server.max_body_bytes
            if int(headers.get("content-length") or 0) > limit:
                raise BodyTooLarge(f"the request body is over the {limit} byte limit (--max-body-mb)")
            seen = [0]

            async def counted_receive():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        raise BodyTooLarge(f"the request body is over the {limit} byte limit (--max-body-mb)")
                return message

            await self.app(scope, counted_receive, send_status)
        except ServeError as e:
            await error_for(e)(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or (path if path in PUBLIC else "other")
            self.server.metrics.request(label, status[0], time.monotonic() - t0)


def _error_response_for(path: str) -> Callable:
    from . import api_a1111, api_openai

    api = api_a1111 if path.startswith("/sdapi/") else api_openai

    def respond(exc: BaseException):
        status, body = api.error_body(exc)
        headers = {"Retry-After": str(exc.retry_after)} if getattr(exc, "retry_after", None) else None
        return JSONResponse(body, status_code=status, headers=headers)

    return respond


async def _json(request) -> Any:
    body = await request.body()
    try:
        return json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None


async def _result(request, job: Job):
    """Wait for a job's result; cancel it when the client goes away or its deadline passes."""
    fut = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({fut}, timeout=0.05)
        if done:
            return fut.result()
        reason = job.stop_reason(time.monotonic())
        if reason is not None:
            job.cancel(reason)
            raise reason
        if await request.is_disconnected():
            job.cancel()
            fut.cancel()
            return None


def create_app(server: Server):
    """The FastAPI app serving ``server``'s models."""
    from . import api_a1111, api_openai
    from .preview import latent_preview, png_b64

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.stop()  # after the last response: the workers' threads end

    app = FastAPI(title="latentrt serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server

    async def error(request: Request, exc: Exception):  # ServeError: its status; the runtime's checks: 400
        if status_of(exc)[0] == 500:
            logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response_for(request.url.path)(exc)

    for exc_type in (ServeError, ValueError, TypeError, Exception):
        app.add_exception_handler(exc_type, error)

    # -- operations ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():  # liveness: a worker thread that crashed makes the process worth restarting
        dead = [name for name, w in server.workers.items() if w.died()]
        if dead:
            return JSONResponse({"status": "dead", "dead_workers": dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        ok = server.ready and not server.draining
        state = "draining" if server.draining else ("ready" if server.ready else "warming up")
        return JSONResponse({"ready": ok, "state": state, "models": list(server.workers)}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # -- OpenAI Images ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return api_openai.models_response(list(server.workers))

    async def images(request: Request, call):
        worker = server.worker(call.model)
        if call.stream:
            return await stream(request, worker, call)
        worker.submit(call.job)
        result = await _result(request, call.job)
        return api_openai.images_response(call, result) if result is not None else Response(status_code=499)

    async def stream(request: Request, worker: Worker, call):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job, wanted = call.job, None

        def on_step(step, steps, latents):  # the worker thread: previews at the chosen steps only
            nonlocal wanted
            if wanted is None:
                wanted = api_openai.partial_steps(steps, call.partial_images)
            if step in wanted:
                loop.call_soon_threadsafe(events.put_nowait, api_openai.partial_events(call, wanted.index(step), latents))

        job.on_step = on_step
        worker.submit(job)  # a full queue or a bad argument answers with its status before the stream starts
        fut = asyncio.wrap_future(job.future)

        def sse(event: dict) -> str:
            return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

        async def body():
            try:
                while not (fut.done() and events.empty()):
                    getter = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({getter, fut}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        for event in getter.result():
                            yield sse(event)
                    else:
                        getter.cancel()
                    reason = job.stop_reason(time.monotonic())
                    if reason is not None:
                        job.cancel(reason)
                if fut.exception() is not None:
                    _, err = api_openai.error_body(fut.exception())
                    yield sse({"type": "error", **err})
                else:
                    for event in api_openai.completed_events(call, fut.result()):
                        yield sse(event)
            finally:
                job.cancel()  # no-op when finished; stops the work when the client went away

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await images(request, api_openai.generation_call(await _json(request)))

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        try:
            form = await request.form(max_part_size=server.max_body_bytes)
        except ServeError:
            raise
        except Exception as e:  # a body that does not parse as multipart
            raise BadRequest(f"send multipart/form-data with an 'image' file and a 'prompt' ({e})") from None
        files = [f for k in ("image", "image[]") for f in form.getlist(k) if hasattr(f, "read")]
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        images_bytes = [await f.read() for f in files]
        return await images(request, api_openai.edit_call(fields, images_bytes))

    # -- AUTOMATIC1111 ------------------------------------------------------------------------------
    async def a1111(request: Request, img2img: bool):
        body = await _json(request)
        model = api_a1111.model_of(body) if isinstance(body, dict) else None
        worker = server.worker(model)
        from ..runtime.schedulers import known_names

        job = api_a1111.job(body, img2img=img2img, known_schedulers=known_names())
        worker.submit(job)
        result = await _result(request, job)
        return api_a1111.response(body, job, result, worker.name) if result is not None else Response(status_code=499)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await a1111(request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await a1111(request, img2img=True)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        busy = [w for w in server.workers.values() if w.progress.get("steps")]
        worker = busy[0] if busy else None
        latents = worker.progress.get("latents") if worker is not None else None
        preview = None if skip_current_image or latents is None else png_b64(latent_preview(latents[:1])[0])
        return api_a1111.progress(worker, preview)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        return {"interrupted": sum(w.interrupt() for w in server.workers.values())}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": n, "model_name": n, "hash": None, "sha256": None, "filename": str(w.pipe.bundle.path),
                 "config": None} for n, w in server.workers.items()]

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from ..runtime.schedulers import known_names

        return api_a1111.samplers(known_names())

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        from ..runtime.schedulers import known_names

        return api_a1111.schedules(known_names())

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": server.current}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await _json(request)
        if not isinstance(body, dict):
            raise BadRequest("options must be a JSON object")
        other = sorted(set(body) - {"sd_model_checkpoint"})
        if other:
            raise NotSupported(f"options {other} are not supported; latentrt takes sd_model_checkpoint only")
        if "sd_model_checkpoint" in body:
            server.current = server.worker(body["sd_model_checkpoint"]).name
        return {"sd_model_checkpoint": server.current}

    app.add_middleware(Gate, server=server)
    return app
