"""Where the OpenVINO engines spend their time: per-op counters of one pipeline call, by op type.

    python -m latentrt.bench.opprofile BUNDLE [--height 512 --width 512 --steps 4 --precision bf16 --top 12]
        [--engine-option shapes=static --engine-option int8_components=unet,vae_decoder ...]

loads the bundle on the openvino backend with ``profile=True`` (OpenVINO's PERF_COUNT), makes one
warm-up image and one profiled image, and prints JSON: per component, its total time in executed ops
and the top op types (with the kernel OpenVINO picked, e.g. ``brgconv_avx512_amx`` or ``jit_avx512``),
each with seconds per call of the component, share and count. ``latentrt report`` shows nothing of it;
benchmarks/RESULTS.md quotes the output.
"""

from __future__ import annotations

import argparse
import json


def top_ops(op_times: dict, calls: int, top: int) -> dict:
    total = sum(t for t, _ in op_times.values())
    rows = sorted(op_times.items(), key=lambda kv: -kv[1][0])[:top]
    return {"seconds_per_call": total / max(1, calls),
            "top": [{"op": op, "kernel": kernel, "seconds_per_call": t / max(1, calls), "share": t / total if total else 0.0,
                     "count_per_call": n // max(1, calls)} for (op, kernel), (t, n) in rows]}


def profile(bundle: str, *, height: int, width: int, steps: int, precision: str, threads: int | None, top: int,
            components=("unet", "vae_decoder"), engine_options: dict | None = None) -> dict:
    import latentrt

    pipe = latentrt.load(bundle, backend="openvino", precision=precision, threads=threads, profile=True,
                         **(engine_options or {}))
    kw = dict(height=height, width=width, num_inference_steps=steps, output_type="np")
    pipe("a photograph", generator=0, **kw)  # compile and warm up
    for c in components:
        pipe.engines[c].op_times.clear()
    out = pipe("a photograph", generator=1, **kw)
    return {c: {**top_ops(pipe.engines[c].op_times, len(out.timings.get(c, [])), top),
                "wall_seconds_per_call": sum(out.timings.get(c, [])) / max(1, len(out.timings.get(c, [])))}
            for c in components}


def profile_arguments(description: str, threads: int | None = None) -> argparse.ArgumentParser:
    """The command line of a profiled call (this module's and :mod:`.opfloor`'s)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("bundle")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another engine option of the openvino backend, e.g. shapes=static (repeatable)")
    return p


#: what the profiling tools set themselves, and what to use instead of an ``--engine-option`` for it
OWN_OPTIONS = {"precision": "--precision", "threads": "--threads", "profile": "nothing (always on here)"}


def parsed_engine_options(args, own: dict = OWN_OPTIONS) -> dict:
    """``--engine-option`` pairs, valued as ``latentrt generate`` values them; a key the tool sets itself
    (``own``) is refused with what to use instead."""
    from ..commands.export import parse_pairs
    from ..commands.generate import engine_options

    taken = [k for k in parse_pairs(args.engine_option, "--engine-option") if k in own]
    if taken:
        raise SystemExit("; ".join(f"--engine-option {k}: set by this tool itself; use {own[k]}" for k in taken))
    return {k: v for k, v in engine_options(args).items() if k != "threads"}


def main(argv=None) -> int:
    p = profile_arguments(__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    print(json.dumps(profile(a.bundle, height=a.height, width=a.width, steps=a.steps, precision=a.precision,
                             threads=a.threads, top=a.top, engine_options=parsed_engine_options(a)), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
