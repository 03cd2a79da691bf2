"""``latentrt serve BUNDLE ... --ray``: the server as a Ray Serve application (see latentrt.serve.ray_app).

Kept apart from :mod:`.serve` so that the single-machine server never imports Ray; Ray is imported
only when ``--ray`` is given.
"""

from __future__ import annotations

import signal
import sys
import threading

from .generate import engine_options


def add_ray_args(p) -> None:
    g = p.add_argument_group("scale-out on Ray Serve (the ray extra)")
    g.add_argument("--ray", action="store_true", help="serve as a Ray Serve application (replicas, autoscaling)")
    g.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    g.add_argument("--autoscale", metavar="MIN,MAX", help="autoscale between MIN (0 allowed) and MAX replicas")
    g.add_argument("--ray-address", help="join this Ray cluster ('auto', HOST:6379); default: start a local one")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each replica reserves (default 0)")
    g.add_argument("--multiplex", type=int, default=0, metavar="K",
                   help="load models on demand, at most K per replica (LRU); default 0 loads every bundle")
    g.add_argument("--max-queued-requests", type=int, default=64,
                   help="requests waiting at each Ray proxy once every replica is full; beyond, 429 (default 64)")


def autoscale_bounds(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--autoscale takes MIN,MAX (two whole numbers, e.g. 1,4), got {text!r}") from None
    return low, high


def run(args, bundles: dict) -> int:
    try:
        import ray
        from ray import serve

        from ..serve.ray_app import ray_app
    except ImportError as e:
        print(f"error: --ray needs the ray extra ({e}); pip install 'latentrt[ray]'", file=sys.stderr)
        return 2
    if args.autoscale and args.replicas != 1:
        raise ValueError("give --replicas N or --autoscale MIN,MAX, not both")
    app = ray_app(bundles, replicas=args.replicas, autoscale=autoscale_bounds(args.autoscale),
                  num_cpus=args.replica_cpus, num_gpus=args.replica_gpus, threads=args.threads,
                  multiplex=args.multiplex, max_queued_requests=args.max_queued_requests,
                  backend=args.backend, device=args.device,
                  engine_options={k: v for k, v in engine_options(args).items() if k != "threads"},
                  max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                  timeout_s=args.timeout_s or None, api_key=args.api_key,
                  max_body_bytes=int(args.max_body_mb * (1 << 20)), warmup=not args.no_warmup,
                  safety_checker={"on": True, "off": False}.get(getattr(args, "safety_checker", None)))
    ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False,
             **({} if args.ray_address else {"_node_ip_address": "127.0.0.1"}))
    # ray.init installs a SIGTERM handler that exits at once (code 15); ours, from here on, shuts the
    # application down gracefully, also when the signal comes while replicas are still deploying
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"latentrt serve --ray: deploying {', '.join(bundles)}; listening on http://{args.host}:{args.port}", flush=True)
    serve.run(app, name="latentrt", route_prefix="/")  # returns once every replica is warmed up
    print("ready", flush=True)
    stop.wait()
    serve.delete("latentrt")  # replicas drain (graceful_shutdown_timeout_s), then stop
    serve.shutdown()
    ray.shutdown()
    return 0
