"""A/B: one UNet step of the full-size SD1.5 (LCM) architecture, the plain graph against the graph with
the ``freeu`` input (``latentrt export --freeu``), the latter with FreeU off (identity factors, what
the runtime feeds when a call does not ask for FreeU) and on (the SD1.5 factors 0.9, 0.2, 1.5, 1.6).

Random weights from :mod:`latentrt.bench.models` (built once, cached). The plain graph is the cached
benchmark bundle's ``unet`` (exported by ``latentrt export``, as bundles without ``--freeu`` are); the
FreeU graph is exported once from the same weights into ``<cache>/unet_freeu/unet/model.onnx`` (fp32).
ONNX Runtime loads both in one process and times the three variants interleaved (the order rotates
each round) after warm-up calls, so machine noise hits all alike; the report gives the median and the
fastest time per variant and the ratios to the plain graph, and checks that FreeU off gives the plain
graph's output.

    flock /tmp/latentrt-heavy.lock python benchmarks/freeu_unet_ab.py --rounds 6

Heavy (a 3.4 GB UNet, exported once, two ONNX Runtime sessions): run it under the lock, alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from latentrt.bench.interleaved import interleaved, unet_step_engines

VARIANTS = ("plain", "freeu_off", "freeu_on")
SD15_FREEU = (0.9, 0.2, 1.5, 1.6)


def graphs(cache: Path, progress=print) -> dict:
    """{"plain": (model.onnx, spec), "freeu": (model.onnx, spec)}, exporting the FreeU graph on first use."""
    from latentrt import components as C
    from latentrt.bench.models import ensure_bundle, ensure_model
    from latentrt.export.freeu import freeu_spec, with_freeu_input
    from latentrt.export.recipes import ComponentPlan

    spec = C.unet_spec(in_channels=4, out_channels=4, vae_scale_factor=8, seq_len=77, cross_attention_dim=768,
                       time_cond_proj_dim=256)
    plain = ensure_bundle("sd15-lcm", "fp32", cache, progress) / "unet" / "model.onnx"
    ranges = {"timestep": (0, 999), "timestep_cond": (-1, 1)}
    root = cache / "unet_freeu"
    path = root / "unet" / "model.onnx"
    if not path.is_file():
        import torch
        from diffusers import UNet2DConditionModel

        from latentrt.export.onnx_export import ExportOptions, export_component
        from latentrt.export.wrappers import UNetWrapper

        src = ensure_model("sd15-lcm", cache, progress)
        unet = UNet2DConditionModel.from_pretrained(str(src / "unet"), dtype=torch.float32).eval()
        plan = with_freeu_input(ComponentPlan(spec, UNetWrapper(unet, [s.name for s in spec.inputs]), ranges))
        root.mkdir(parents=True, exist_ok=True)
        progress(f"exporting the FreeU UNet graph to {root}")
        t0 = time.perf_counter()
        export_component(plan.module, plan.spec, root / "unet", export_sizes={"B": 1, "H": 512, "W": 512},
                         check_sizes=[], bundle_root=root,
                         options=ExportOptions(check=False, progress=progress, value_ranges=plan.value_ranges))
        progress(f"  {time.perf_counter() - t0:.0f}s")
        del unet, plan
        gc.collect()
    return {"plain": (plain, spec), "freeu": (path, freeu_spec(spec))}


def inputs(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = size // 8
    return {"sample": rng.standard_normal((1, 4, n, n), dtype=np.float32),
            "timestep": np.array([499.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 768), dtype=np.float32),
            "timestep_cond": rng.standard_normal((1, 256), dtype=np.float32)}


def ab(g: dict, *, rounds: int, warmup: int, threads: int, size: int, progress=print) -> dict:
    engines = unet_step_engines("onnxruntime", g, threads, progress=progress)
    x = inputs(size)
    calls = {"plain": lambda: engines["plain"](**x),
             "freeu_off": lambda: engines["freeu"](**x, freeu=np.ones(4, np.float32)),
             "freeu_on": lambda: engines["freeu"](**x, freeu=np.asarray(SD15_FREEU, np.float32))}
    outs = {v: calls[v]()["out_sample"] for v in VARIANTS}  # first call + numerical check
    timed = interleaved(calls, rounds=rounds, warmup=warmup - 1, progress=progress)
    times, med, best = timed["times_s"], timed["median_s"], timed["min_s"]
    result = {"backend": "onnxruntime", "precision": "fp32", "size": size, "threads": threads, "rounds": rounds,
              "median_s": med, "min_s": best, "times_s": times,
              "ratio_median": {v: med[v] / med["plain"] for v in VARIANTS[1:]},
              "ratio_min": {v: best[v] / best["plain"] for v in VARIANTS[1:]},
              "max_abs_off_vs_plain": float(np.abs(outs["freeu_off"] - outs["plain"]).max()),
              "max_abs_on_vs_plain": float(np.abs(outs["freeu_on"] - outs["plain"]).max()),
              "freeu_on": list(SD15_FREEU)}
    engines.clear()  # free the compiled models before the next backend loads
    gc.collect()
    return result


#: the nodes the tracer puts directly in the first two up blocks' scope (not in a resnet, attention or
#: upsampler): FreeU's ops, plus the skip concatenation that the plain graph has too
FREEU_SCOPE = re.compile(r"/up_blocks\.[01]/[^/]+$")


def op_profile(g: dict, *, threads: int, size: int, runs: int = 3) -> dict:
    """Per graph and variant: ONNX Runtime's kernel time per step (ms), all nodes and the nodes in
    :data:`FREEU_SCOPE`, from the session profiler (less disturbed by other load than end-to-end times)."""
    import onnxruntime as ort

    x = inputs(size)
    feeds = {"plain": ("plain", {}), "freeu_off": ("freeu", {"freeu": np.ones(4, np.float32)}),
             "freeu_on": ("freeu", {"freeu": np.asarray(SD15_FREEU, np.float32)})}
    out = {}
    for graph in ("plain", "freeu"):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        for v, (gg, extra) in feeds.items():
            if gg != graph:
                continue
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"freeu-ab-{v}")
            sess = ort.InferenceSession(str(g[graph][0]), sess_options=so, providers=["CPUExecutionProvider"])
            for _ in range(runs + 1):
                sess.run(None, {**x, **extra})
            path = sess.end_profiling()
            events = json.loads(Path(path).read_text())
            Path(path).unlink()
            # kernel events of all runs: split evenly, drop the first run (arena growth)
            nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            n = len(nodes) // (runs + 1)
            nodes = nodes[n:]
            total = sum(e["dur"] for e in nodes) / runs / 1000
            scope = [e for e in nodes if FREEU_SCOPE.search(e["name"][: -len("_kernel_time")])]
            ops = {}
            for e in scope:
                op = e.get("args", {}).get("op_name", "?")
                ops[op] = ops.get(op, 0) + e["dur"] / runs / 1000
            out[v] = {"total_ms": total, "freeu_scope_ms": sum(ops.values()), "freeu_scope_ops_ms": ops}
            del sess
            gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (latents size/8)")
    p.add_argument("--cache-dir", type=Path, help="default: the benchmark model cache")
    p.add_argument("--out", type=Path, help="append the result as a JSON line")
    p.add_argument("--op-profile", action="store_true",
                   help="also report ONNX Runtime's kernel time of FreeU's nodes (profiler) per variant")
    args = p.parse_args(argv)
    from latentrt.bench.models import default_cache_dir

    g = graphs(args.cache_dir or default_cache_dir())
    res = ab(g, rounds=args.rounds, warmup=args.warmup, threads=args.threads, size=args.size)
    if args.op_profile:
        res["op_profile"] = op_profile(g, threads=args.threads, size=args.size)
        for v, prof in res["op_profile"].items():
            ops = ", ".join(f"{op} {ms:.2f}" for op, ms in sorted(prof["freeu_scope_ops_ms"].items()))
            print(f"  {v}: kernels {prof['total_ms']:.0f} ms per step, of which the up blocks 0-1's own nodes "
                  f"{prof['freeu_scope_ms']:.2f} ms ({ops})")
    m, b = res["median_s"], res["min_s"]
    print(f"onnxruntime fp32, SD1.5 UNet, {args.size}x{args.size}, batch 1, {args.threads} threads, {args.rounds} rounds: "
          f"median plain {m['plain']:.3f}s, FreeU graph off {m['freeu_off']:.3f}s "
          f"({res['ratio_median']['freeu_off']:.3f}x), on {m['freeu_on']:.3f}s ({res['ratio_median']['freeu_on']:.3f}x); "
          f"fastest plain {b['plain']:.3f}s, off {b['freeu_off']:.3f}s ({res['ratio_min']['freeu_off']:.3f}x), "
          f"on {b['freeu_on']:.3f}s ({res['ratio_min']['freeu_on']:.3f}x); max abs off vs plain "
          f"{res['max_abs_off_vs_plain']:.2e}, on vs plain {res['max_abs_on_vs_plain']:.2e}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
