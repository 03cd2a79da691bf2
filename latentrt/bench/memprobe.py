"""Peak RSS (and the load and first-image times) of the runtime alone: a fresh process that imports only latentrt's runtime (numpy, ONNX
Runtime), loads a bundle and makes one call. This is the number the "peak RSS at most 1.3x the
weight bytes" target is about: the benchmark process itself also holds torch, diffusers and the
allocator's leftovers of earlier phases, which would blur a per-phase measurement.

``python -m latentrt.bench.memprobe BUNDLE --height H --width W --steps N [--vae tiny]`` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .memory import _status_kb, current_rss


def probe(bundle: str, *, height: int, width: int, steps: int, batch: int, vae: str, backend: str, device: str,
          threads: int, engine_options: dict) -> dict:
    import numpy  # noqa: F401  (count the runtime's own imports in the baseline)
    import onnxruntime  # noqa: F401

    import latentrt

    rss_imports = current_rss()
    t0 = time.perf_counter()
    pipe = latentrt.load(bundle, backend=backend, device=device, threads=threads, **engine_options)
    t1 = time.perf_counter()
    kw = {"vae": vae} if vae != "full" else {}
    pipe("a photograph", height=height, width=width, num_inference_steps=steps, num_images_per_prompt=batch,
         generator=0, output_type="np", **kw)
    t2 = time.perf_counter()
    m = pipe.bundle.manifest
    weights = sum(sum(m.components[c].sizes.values()) for c in pipe.engines if c in m.components)
    return {"rss_after_imports_bytes": rss_imports, "peak_rss_bytes": _status_kb("VmHWM") or current_rss(),
            "weight_bytes": weights, "seconds": t2 - t0, "load_s": t1 - t0, "first_image_s": t2 - t1,
            "torch_imported": "torch" in sys.modules}


def run_probe(bundle, sc, timeout: float = 1800) -> dict:
    """Run :func:`probe` for scenario ``sc`` in a subprocess; {"error": ...} when it fails."""
    cmd = [sys.executable, "-m", "latentrt.bench.memprobe", str(bundle), "--height", str(sc.height), "--width",
           str(sc.width), "--steps", str(sc.steps), "--batch", str(sc.batch), "--vae", sc.vae, "--backend",
           sc.backend, "--device", sc.device, "--threads", str(sc.resolved_threads),
           "--engine-options", json.dumps(sc.engine_options)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout, env=dict(os.environ))
        if r.returncode != 0:
            return {"error": r.stderr.strip()[-500:]}
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vae", default="full")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engine-options", default="{}")
    a = p.parse_args(argv)
    out = probe(a.bundle, height=a.height, width=a.width, steps=a.steps, batch=a.batch, vae=a.vae, backend=a.backend,
                device=a.device, threads=a.threads, engine_options=json.loads(a.engine_options))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
