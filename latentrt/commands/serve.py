"""latentrt serve BUNDLE [BUNDLE ...]: the HTTP image server (OpenAI Images + A1111 APIs, playground)."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from .generate import add_runtime_args, engine_options
from .serve_ray import add_ray_args

logger = logging.getLogger("latentrt.serve")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve bundles over HTTP (OpenAI Images and A1111 APIs)",
                       description="Serve bundles over HTTP: the OpenAI Images and AUTOMATIC1111 APIs, a playground page, "
                                   "health, readiness and Prometheus metrics.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE",
                   help="bundle folder; its model name is the folder name (NAME=PATH to choose another)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    add_runtime_args(p)
    p.add_argument("--max-batch", type=int, default=4,
                   help="most images in one pipeline call; compatible requests share it (1 turns batching off)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long the oldest request waits for batch-mates (default 20 ms)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests waiting per model before new ones get 429 with Retry-After (default 32)")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="a request's deadline from arrival; past it, it is cancelled between steps (504)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (except /, /health and /ready)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (413 beyond it)")
    p.add_argument("--drain-s", type=float, default=60.0,
                   help="on SIGTERM, how long in-flight work may finish while new work gets 503 (default 60)")
    p.add_argument("--no-warmup", action="store_true", help="skip the one-step warm-up call before /ready")
    p.add_argument("--safety-checker", choices=["on", "off"], default=None,
                   help="run the bundles' safety checkers (on: every bundle must carry one; off: none); default: each "
                        "bundle's when it has one. Flagged images come back black and marked nsfw_content_detected")
    add_ray_args(p)
    p.set_defaults(func=run)


def model_bundles(specs: list[str]) -> dict[str, Path]:
    """``PATH`` or ``NAME=PATH`` -> {name: path}; names must be unique."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        path = Path(path if sep else spec)
        name = name if sep else path.resolve().name
        if name in out:
            raise ValueError(f"two bundles are named {name!r}; give one another name with NAME=PATH")
        out[name] = path
    return out


def run(args) -> int:
    if args.ray:
        from . import serve_ray

        return serve_ray.run(args, model_bundles(args.bundles))
    try:
        import uvicorn

        from ..serve.app import create_app, load_server
    except ImportError as e:
        print(f"error: latentrt serve needs the serve extra ({e}); pip install 'latentrt[serve]'", file=sys.stderr)
        return 2

    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # "ready", "draining"
    server = load_server(model_bundles(args.bundles), backend=args.backend, device=args.device,
                         engine_options=engine_options(args), max_batch=args.max_batch,
                         batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout_s or None,
                         api_key=args.api_key, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                         warmup=not args.no_warmup,
                         safety_checker={"on": True, "off": False}.get(getattr(args, "safety_checker", None)))

    class Graceful(uvicorn.Server):
        """SIGTERM / Ctrl-C: drain first (new work 503, in-flight work finishes), then stop."""

        def handle_exit(self, sig, frame):
            if server.draining:  # a second signal: stop the running work between steps, then exit
                for w in server.workers.values():
                    w.interrupt()
                self.force_exit = True
                return super().handle_exit(sig, frame)
            logger.warning("draining: finishing in-flight work (up to %g s), refusing new work", args.drain_s)
            server.drain()

            def finish():
                server.wait_idle(args.drain_s)
                self.should_exit = True  # uvicorn's own graceful stop: open responses finish, exit 0

            threading.Thread(target=finish, daemon=True).start()

    print(f"latentrt serve: loading {', '.join(server.workers)}; listening on http://{args.host}:{args.port} "
          "(/ready says when warmed up)", flush=True)
    Graceful(uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=30)).run()
    server.stop()
    return 0
