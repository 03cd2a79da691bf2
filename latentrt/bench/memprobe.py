"""Peak RSS (and the load and first-image times) of the runtime alone: a fresh process that imports only latentrt's runtime (numpy, ONNX
Runtime), loads a bundle and makes one call. This is the number the "peak RSS at most 1.3x the
weight bytes" target is about: the benchmark process itself also holds torch, diffusers and the
allocator's leftovers of earlier phases, which would blur a per-phase measurement.

``python -m latentrt.bench.memprobe BUNDLE --scenario JSON`` (a scenario's fields, as
``Scenario.to_dict`` gives them) prints JSON. The call is the scenario's task's (:mod:`.tasks`), so the
probe measures the pipeline that is benchmarked (an upscale, a variation, ...), with the same input image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .memory import _status_kb, current_rss


def probe(bundle: str, sc) -> dict:
    """Load ``bundle`` as scenario ``sc`` says and make one call of its task; peak RSS and times."""
    import numpy  # noqa: F401  (count the runtime's own imports in the baseline)
    import onnxruntime  # noqa: F401

    import latentrt

    from .tasks import latentrt_kwargs

    rss_imports = current_rss()
    t0 = time.perf_counter()
    pipe = latentrt.load(bundle, backend=sc.backend, device=sc.device, threads=sc.resolved_threads,
                         **sc.engine_options)
    t1 = time.perf_counter()
    pipe("a photograph", generator=0, **latentrt_kwargs(sc))
    t2 = time.perf_counter()
    m = pipe.bundle.manifest
    weights = sum(sum(m.components[c].sizes.values()) for c in pipe.engines if c in m.components)
    return {"rss_after_imports_bytes": rss_imports, "peak_rss_bytes": _status_kb("VmHWM") or current_rss(),
            "weight_bytes": weights, "seconds": t2 - t0, "load_s": t1 - t0, "first_image_s": t2 - t1,
            "torch_imported": "torch" in sys.modules}


def run_probe(bundle, sc, timeout: float = 1800) -> dict:
    """Run :func:`probe` for scenario ``sc`` in a subprocess; {"error": ...} when it fails."""
    cmd = [sys.executable, "-m", "latentrt.bench.memprobe", str(bundle), "--scenario",
           json.dumps(dict(sc.to_dict(), threads=sc.resolved_threads))]
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
    p.add_argument("--scenario", required=True, help="the scenario's fields as JSON (Scenario.to_dict)")
    a = p.parse_args(argv)
    from .scenarios import make_scenario

    out = probe(a.bundle, make_scenario(json.loads(a.scenario), "--scenario"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
