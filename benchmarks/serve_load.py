"""A bounded load generator for ``latentrt serve``: images/minute and latency at several concurrencies,
batching on and off, every response checked.

    python benchmarks/serve_load.py --bundle BUNDLE [--concurrency 1,4,16] [--requests 16] \
        [--batching on,off] [--ray 1,2] [--max-batch 4] [--size 512x512] [--steps 4] [--backend openvino] [--json OUT]

For each batching setting it starts the server on a free loopback port (``--max-batch N`` for "on",
1 for "off"; ``--ray 1,2`` adds ``latentrt serve --ray --replicas N`` servers, batching on; or pass
``--url`` to load a running server), then for each concurrency sends
``--requests`` requests from that many client threads (OpenAI ``/v1/images/generations``) and
reports images/minute, p50/p99 latency, 429s (answered by waiting ``Retry-After`` and sending again,
at most ``--max-retries`` times) and the server's mean batch size.

Every response is checked: status, one PNG that decodes, at the size asked. Request ``i`` and
``i + requests/2`` carry the same seed and prompt, so their images must be equal, and all others
must differ: a lost, duplicated or mixed-up image fails the run (exit 1). ``--verify`` also compares
every image with the library's own for its seed (cheap for tiny bundles only).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, max_batch: int, args, ray_replicas: int = 0) -> tuple[subprocess.Popen, str]:
    """``latentrt serve`` on a free loopback port; with ``ray_replicas``, ``--ray --replicas N`` on a local
    Ray instance started by the server (each replica 1 CPU, ``--threads`` threads)."""
    port = free_port()
    cmd = [sys.executable, "-m", "latentrt.cli", "serve", f"m={bundle}", "--port", str(port),
           "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-queue", str(args.max_queue), "--backend", args.backend, "--timeout-s", "0"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if ray_replicas:
        cmd += ["--ray", "--replicas", str(ray_replicas)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + args.start_timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become ready in time")


def batch_stats(url: str | None) -> tuple[float, float]:
    """(images, calls) so far, from the server's batch-size histogram (none for a Ray deployment, whose
    /metrics is one replica's)."""
    if url is None:
        return 0.0, 0.0
    text = httpx.get(url + "/metrics", timeout=10).text
    vals = {}
    for line in text.splitlines():
        for name in ("latentrt_batch_images_sum", "latentrt_batch_images_count"):
            if line.startswith(name + "{"):
                vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return vals.get("latentrt_batch_images_sum", 0.0), vals.get("latentrt_batch_images_count", 0.0)


def one_level(url: str, concurrency: int, args, model: str | None, metrics: bool = True) -> dict:
    """``args.requests`` requests from ``concurrency`` threads; every response checked."""
    n = args.requests
    half = max(1, n // 2)
    width, height = (int(v) for v in args.size.split("x"))
    results: list[dict | None] = [None] * n
    next_index = iter(range(n))
    lock = threading.Lock()
    too_many = [0]
    # every client opens its connection pool first and all start sending together, so that
    # ``concurrency`` requests really are outstanding at once (creating an httpx client takes a few
    # ms, enough for a tiny model's request to finish before the next thread's first one arrives)
    started: list[float] = []
    barrier = threading.Barrier(concurrency, action=lambda: started.append(time.monotonic()))

    def body(i: int) -> dict:
        b = {"prompt": f"load test image {i % half}", "size": args.size,
             "seed": 1000 + i % half, "num_inference_steps": args.steps}
        return {**b, "model": model} if model else b

    def client():
        with httpx.Client(timeout=args.request_timeout_s) as http:
            barrier.wait()
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.monotonic()
                for _ in range(args.max_retries + 1):
                    r = http.post(url + "/v1/images/generations", json=body(i))
                    if r.status_code != 429:
                        break
                    with lock:
                        too_many[0] += 1
                    time.sleep(min(float(r.headers.get("Retry-After", 1)), args.max_retry_wait_s))
                results[i] = {"status": r.status_code, "seconds": time.monotonic() - t0,
                              "json": r.json() if r.headers.get("content-type", "").startswith("application/json")
                              else None}

    images0, calls0 = batch_stats(url if metrics else None)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started[0]
    images1, calls1 = batch_stats(url if metrics else None)

    problems, digests = [], []
    for i, r in enumerate(results):
        if r is None or r["status"] != 200:
            problems.append(f"request {i}: {'lost' if r is None else r['status']} {r and r['json']}")
            digests.append(None)
            continue
        data = r["json"].get("data") or []
        if len(data) != 1:
            problems.append(f"request {i}: {len(data)} images, expected 1")
            digests.append(None)
            continue
        try:
            img = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"])))
            img.load()
        except Exception as e:  # a garbled image
            problems.append(f"request {i}: the image does not decode ({e})")
            digests.append(None)
            continue
        if img.size != (width, height):
            problems.append(f"request {i}: image is {img.size}, expected {(width, height)}")
        digests.append(hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest())
        if args.verify is not None:
            want = args.verify(body(i))
            if not np.array_equal(np.asarray(img.convert("RGB")), want):
                problems.append(f"request {i}: the image differs from the library's for seed {body(i)['seed']}")
    for i, d in enumerate(digests):  # same seed and prompt -> same image; otherwise different
        if d is None:
            continue
        for j in range(i + 1, n):
            if digests[j] is None:
                continue
            same_request = body(i) == body(j)
            if same_request != (d == digests[j]):
                problems.append(f"requests {i} and {j}: images {'differ' if same_request else 'are equal'}")
    ok = [r["seconds"] for r in results if r is not None and r["status"] == 200]
    calls = calls1 - calls0
    return {
        "concurrency": concurrency, "requests": n, "ok": len(ok), "status_429": too_many[0],
        "images_per_minute": round(60.0 * len(ok) / wall, 2), "wall_s": round(wall, 2),
        "p50_s": round(float(np.percentile(ok, 50)), 3) if ok else None,
        "p99_s": round(float(np.percentile(ok, 99)), 3) if ok else None,
        "mean_batch_images": round((images1 - images0) / calls, 2) if calls else None,
        "problems": problems,
    }


def library_checker(bundle: str, backend: str):
    import latentrt

    pipe = latentrt.load(bundle, backend=backend)

    def want(body: dict) -> np.ndarray:
        w, h = (int(v) for v in body["size"].split("x"))
        out = pipe(body["prompt"], num_inference_steps=body["num_inference_steps"], height=h, width=w,
                   generator=body["seed"])
        return np.asarray(out.images[0])

    return want


def markdown(rows: list[dict]) -> str:
    lines = ["| batching | concurrency | images/min | p50 s | p99 s | mean batch | 429s | ok/requests |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batching']} | {r['concurrency']} | {r['images_per_minute']} | {r['p50_s']} | "
                     f"{r['p99_s']} | {r['mean_batch_images']} | {r['status_429']} | {r['ok']}/{r['requests']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle to serve (a server is started per batching setting)")
    p.add_argument("--url", help="load a running server instead (its batching as configured)")
    p.add_argument("--model", help="model name to ask for (default: the server's first)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default 16)")
    p.add_argument("--batching", default="on,off", help="'on', 'off' or 'on,off' (servers started in turn)")
    p.add_argument("--ray", default="", metavar="N1,N2",
                   help="also serve with --ray --replicas N for each N (batching on), e.g. 1,2 (the ray extra)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the server settings, interleaved (default 1)")
    p.add_argument("--max-batch", type=int, default=4, help="--max-batch of the 'on' server (default 4)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    p.add_argument("--max-queue", type=int, default=64, help="server --max-queue (small values provoke 429s)")
    p.add_argument("--size", default="512x512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, help="server engine threads")
    p.add_argument("--verify", action="store_true", help="compare every image with the library's (tiny bundles)")
    p.add_argument("--max-retries", type=int, default=20, help="429 retries per request (default 20)")
    p.add_argument("--max-retry-wait-s", type=float, default=5.0, help="cap on one Retry-After wait")
    p.add_argument("--request-timeout-s", type=float, default=900.0)
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the servers (finally below)
    if not args.bundle and not args.url:
        p.error("pass --bundle (servers are started) or --url (a running server)")
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = ([s.strip() for s in args.batching.split(",") if s.strip()]
                + [f"ray x{int(n)}" for n in args.ray.split(",") if n.strip()]) * args.rounds
    args.verify = library_checker(args.bundle, args.backend) if args.verify and args.bundle else None

    rows = []
    for setting in settings if not args.url else ["as configured"]:
        proc = None
        url = args.url
        if not url:
            replicas = int(setting.split("x")[1]) if setting.startswith("ray") else 0
            proc, url = start_server(args.bundle, args.max_batch if setting != "off" else 1, args, replicas)
        try:
            for c in levels:
                row = {"batching": setting, **one_level(url, c, args, args.model, not setting.startswith("ray"))}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "problems"}), flush=True)
                for msg in row["problems"][:10]:
                    print("  PROBLEM", msg, flush=True)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)  # drains: nothing is in flight after a level
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = sum(len(r["problems"]) for r in rows)
    if bad:
        print(f"{bad} problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
