"""Where a new process's first image from an already-used bundle goes (issue 18, cold start).

    python benchmarks/cold_start.py BUNDLE [--runs 2] [--shapes dynamic static] [--precision bf16] [--vae full]
        [--engine-option int8_components=unet,vae_decoder ...]

For each ``--shapes`` mode (``static-ovlookup``: without the direct import of recorded blobs; see
``--help``), ``--runs`` fresh processes in turn (interleaved across modes), each timing: imports (numpy,
openvino, latentrt), opening the bundle (manifest + file verification), creating the pipeline's
engines (IR conversion cache lookup; a dynamic model compiles here), then the first image, with the
compile/import seconds of each component (``engine.compilations``: a static model compiles, or
imports its cached blob, on its first call), then the same image again (``second_image_s``, warm), so
that ``first_use_extra_s`` = imports + open + load + first image - second image is what a new process
costs beyond a warm image. The parent adds each process's wall time from spawn to exit (both images)
and its peak RSS (VmHWM). The first process of a mode may fill caches (IR,
compiled models); later ones show a new process on the already-used bundle. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


#: what this script sets itself, and what to use instead of an ``--engine-option`` for it
OWN_OPTIONS = {"precision": "--precision", "shapes": "--shapes", "threads": "--threads"}


def child(bundle: str, shapes: str, precision: str, vae: str, size: int, steps: int, threads: int,
          options: dict | None = None) -> dict:
    t0 = time.perf_counter()
    import numpy  # noqa: F401
    import openvino  # noqa: F401

    import latentrt
    from latentrt.runtime.bundle import Bundle

    t1 = time.perf_counter()
    Bundle(bundle)  # manifest + verification (cached by size and mtime after the first time)
    t2 = time.perf_counter()
    mode, _, variant = shapes.partition("-")
    if variant == "ovlookup":  # records not used: OpenVINO's own cache lookup, as before openvino_blobs
        from latentrt.runtime.engines import openvino as ov_engine

        ov_engine.import_recorded = lambda *args, **kwargs: None
    pipe = latentrt.load(bundle, backend="openvino", precision=precision, shapes=mode, threads=threads, **(options or {}))
    t3 = time.perf_counter()
    kw = {"vae": vae} if vae != "full" else {}
    out = pipe("a photograph", height=size, width=size, num_inference_steps=steps, generator=0, output_type="np", **kw)
    t4 = time.perf_counter()
    compiles = {c: round(sum(x["seconds"] for x in e.compilations), 3) for c, e in pipe.engines.items() if e.compilations}
    sources = {c: [x.get("source") for x in e.compilations] for c, e in pipe.engines.items() if e.compilations}
    t5 = time.perf_counter()
    pipe("a photograph", height=size, width=size, num_inference_steps=steps, generator=0, output_type="np", **kw)
    second = time.perf_counter() - t5  # the same image again, warm: first_image_s - second_image_s is first use
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return {"imports_s": t1 - t0, "open_bundle_s": t2 - t1, "load_s": t3 - t2, "first_image_s": t4 - t3,
            "compile_or_import_s": compiles, "sources": sources, "second_image_s": second,
            "first_use_extra_s": (t3 - t0) + (t4 - t3) - second,
            "stages_s": {k: round(sum(v), 3) for k, v in out.timings.items()},
            "peak_rss_bytes": hwm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=["dynamic", "static"],
                   choices=["dynamic", "static", "static-ovlookup"],
                   help="static-ovlookup: static shapes without the direct import of recorded blobs "
                        "(OpenVINO's own cache lookup, as before latentrt/runtime/engines/openvino_blobs.py)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--vae", default="full")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another engine option of the openvino backend, e.g. int8_components=unet,vae_decoder")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from latentrt.bench.opprofile import parsed_engine_options

    options = parsed_engine_options(a, OWN_OPTIONS)  # a bad --engine-option stops here, before any process starts
    if a.child:
        print(json.dumps(child(a.bundle, a.child, a.precision, a.vae, a.size, a.steps, a.threads, options)))
        return 0
    for run in range(a.runs):
        for shapes in a.shapes:
            cmd = [sys.executable, __file__, a.bundle, "--child", shapes, "--precision", a.precision, "--vae", a.vae,
                   "--size", str(a.size), "--steps", str(a.steps), "--threads", str(a.threads),
                   *(x for o in a.engine_option for x in ("--engine-option", o))]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", env=dict(os.environ))
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                print(json.dumps({"shapes": shapes, "run": run, "error": r.stderr.strip()[-800:]}), flush=True)
                continue
            rec = json.loads(r.stdout.strip().splitlines()[-1])
            print(json.dumps({"shapes": shapes, "run": run, "process_wall_s": wall, **rec}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
