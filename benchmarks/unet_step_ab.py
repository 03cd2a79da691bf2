"""A/B: one UNet step of the full-size SD1.5 (LCM) architecture, the graph traced on diffusers'
divisible-size branch ("old": ``scale_factor=2`` upsampling, what bundles were before
``explicit_upsample_sizes``) against the graph that takes every upsample size from its skip tensor
("new": the one ``latentrt export`` writes now, serving every multiple of 8).

Random weights from :mod:`latentrt.bench.models` (built once, cached). Both graphs are exported
once into ``<cache>/unet_ab/{old,new}/model.onnx`` (fp32). Each backend then loads both graphs in
one process and times them interleaved (ABAB, then BABA, ...) after warm-up calls, so machine noise
hits both alike; the report gives the median per graph and the ratio new/old.

    flock /tmp/latentrt-heavy.lock python benchmarks/unet_step_ab.py --rounds 6

Heavy (a 3.4 GB UNet, exported twice on the first run, two sessions per backend): run it under the
lock, alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from latentrt.bench.interleaved import interleaved, unet_step_engines

VARIANTS = ("old", "new")


def export_variants(cache: Path, progress=print, channels: tuple[int, ...] | None = None) -> dict[str, tuple[Path, object]]:
    """{variant: (model.onnx, unet spec)}, exporting what is not cached yet. ``channels``: the SD1.5
    architecture with other ``block_out_channels`` (random weights built here; light enough to run
    without the lock), instead of the cached full-size model."""
    from latentrt import components as C
    from latentrt.bench.models import ensure_model

    spec = C.unet_spec(in_channels=4, out_channels=4, vae_scale_factor=8, seq_len=77, cross_attention_dim=768,
                       time_cond_proj_dim=256)
    folder = "unet_ab" + ("-" + "-".join(map(str, channels)) if channels else "")
    out = {v: (cache / folder / v / "unet" / "model.onnx", spec) for v in VARIANTS}
    todo = [v for v, (p, _) in out.items() if not p.is_file()]
    if todo:
        import torch
        from diffusers import UNet2DConditionModel

        from latentrt.export.onnx_export import ExportOptions, export_component
        from latentrt.export.wrappers import UNetWrapper

        class DivisibleBranchUNet(UNetWrapper):
            """The wrapper as it was before explicit_upsample_sizes (commit 8beb3d7)."""

            def forward(self, *args):
                kw = dict(zip(self.input_names, args))
                return self.unet(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], return_dict=False,
                                 timestep_cond=kw["timestep_cond"])[0]

        if channels:
            from latentrt.bench.models import SD15_LCM_UNET

            torch.manual_seed(0)
            unet = UNet2DConditionModel(**{**SD15_LCM_UNET, "block_out_channels": channels}).eval()
        else:
            src = ensure_model("sd15-lcm", progress=progress)
            unet = UNet2DConditionModel.from_pretrained(str(src / "unet"), dtype=torch.float32).eval()
        names = [s.name for s in spec.inputs]
        wrappers = {"old": DivisibleBranchUNet(unet, names), "new": UNetWrapper(unet, names)}
        for v in todo:
            root = out[v][0].parent.parent
            root.mkdir(parents=True, exist_ok=True)
            progress(f"exporting the {v} UNet graph to {root}")
            t0 = time.perf_counter()
            export_component(wrappers[v], spec, root / "unet", export_sizes={"B": 1, "H": 512, "W": 512},
                             check_sizes=[], bundle_root=root,
                             options=ExportOptions(check=False, progress=progress,
                                                   value_ranges={"timestep": (0, 999), "timestep_cond": (-1, 1)}))
            progress(f"  {time.perf_counter() - t0:.0f}s")
        del unet, wrappers
        gc.collect()
    return out


def inputs(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = size // 8
    return {"sample": rng.standard_normal((1, 4, n, n), dtype=np.float32),
            "timestep": np.array([499.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 768), dtype=np.float32),
            "timestep_cond": rng.standard_normal((1, 256), dtype=np.float32)}


def ab(backend: str, graphs: dict, *, rounds: int, warmup: int, threads: int, size: int, scratch: Path,
       progress=print) -> dict:
    engines = unet_step_engines(backend, {v: graphs[v] for v in VARIANTS}, threads, scratch, progress)
    x = inputs(size)
    outs = {v: engines[v](**x)["out_sample"] for v in VARIANTS}  # first call + numerical check
    timed = interleaved({v: (lambda v=v: engines[v](**x)) for v in VARIANTS}, rounds=rounds, warmup=warmup - 1,
                        progress=progress, label=f"{backend}: ")
    times, med, best = timed["times_s"], timed["median_s"], timed["min_s"]  # min: the least disturbed by other load
    result = {"backend": backend, "precision": "fp32" if backend == "onnxruntime" else engines["new"].precision,
              "size": size, "threads": threads, "rounds": rounds,
              "median_s": med, "min_s": best, "times_s": times, "ratio_new_over_old": med["new"] / med["old"],
              "ratio_of_min": best["new"] / best["old"],
              "max_abs_new_vs_old": float(np.abs(outs["new"] - outs["old"]).max())}
    engines.clear()  # free the compiled models before the next backend loads
    gc.collect()
    return result


#: the ops where the two graphs differ (ONNX Runtime: its NCHWc Upsample, or a Resize and layout reorders
#: around it; OpenVINO: Interpolate and the shape arithmetic that feeds it)
DIFFERING_OPS = {"onnxruntime": ("Upsample", "Resize", "ReorderInput", "ReorderOutput", "Shape", "Gather", "Concat"),
                 "openvino": ("Interpolate", "ShapeOf", "Gather", "Concatenation", "Reorder")}


def op_profile(backend: str, graphs: dict, *, threads: int, size: int, runs: int = 3) -> dict:
    """Per-op-type kernel time (ms per run, share of the step) of each graph, from the engines' own
    profilers: what the ops that differ between the graphs cost, less disturbed by other load than
    end-to-end times."""
    import collections

    x = inputs(size)
    out = {}
    for v in VARIANTS:
        path = str(graphs[v][0])
        by = collections.Counter()
        if backend == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.log_severity_level, so.enable_profiling = threads, 3, True
            so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"unet-ab-{v}")
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            for _ in range(runs):
                sess.run(None, x)
            trace = Path(sess.end_profiling())
            for e in json.loads(trace.read_text()):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    by[e["args"]["op_name"]] += e["dur"] / 1e3
            trace.unlink()
            del sess
        else:
            import openvino as ov

            core = ov.Core()
            compiled = core.compile_model(core.read_model(path), "CPU", {
                "PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            for _ in range(runs):
                request.infer(x)
                for node in request.profiling_info:
                    by[node.node_type] += node.real_time.total_seconds() * 1e3
            del request, compiled
        total = sum(by.values())
        out[v] = {"total_ms": total / runs,
                  **{op: {"ms": by[op] / runs, "share": by[op] / total} for op in DIFFERING_OPS[backend]}}
        gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="onnxruntime,openvino")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (latents size/8)")
    p.add_argument("--cache-dir", type=Path, help="default: the benchmark model cache")
    p.add_argument("--out", type=Path, help="append the results as JSON lines")
    p.add_argument("--op-profile", action="store_true",
                   help="also report, per backend, the kernel time of the ops where the graphs differ")
    p.add_argument("--block-out-channels", help="e.g. 64,128,256,256: a narrower SD1.5 UNet (random weights built "
                                                 "here) instead of the full-size one")
    args = p.parse_args(argv)
    from latentrt.bench.models import default_cache_dir

    cache = args.cache_dir or default_cache_dir()
    channels = tuple(int(c) for c in args.block_out_channels.split(",")) if args.block_out_channels else None
    graphs = export_variants(cache, channels=channels)
    results = []
    with tempfile.TemporaryDirectory(prefix="unet-ab-") as scratch:
        for backend in args.backends.split(","):
            res = ab(backend, graphs, rounds=args.rounds, warmup=args.warmup, threads=args.threads, size=args.size,
                     scratch=Path(scratch))
            res["block_out_channels"] = list(channels or (320, 640, 1280, 1280))
            if args.op_profile:
                res["op_profile"] = op_profile(backend, graphs, threads=args.threads, size=args.size)
                for v, prof in res["op_profile"].items():
                    ops = ", ".join(f"{op} {d['ms']:.1f} ms ({100 * d['share']:.2f}%)" for op, d in prof.items()
                                    if op != "total_ms" and d["ms"])
                    print(f"  {backend} {v}: kernels {prof['total_ms']:.0f} ms per step; {ops}")
            results.append(res)
            print(f"{backend} ({res['precision']}), UNet {res['block_out_channels']}, {args.size}x{args.size}, batch 1, "
                  f"{args.threads} threads: "
                  f"old {res['median_s']['old']:.3f}s, new {res['median_s']['new']:.3f}s, new/old "
                  f"{res['ratio_new_over_old']:.3f}; fastest old {res['min_s']['old']:.3f}s, new {res['min_s']['new']:.3f}s, "
                  f"new/old {res['ratio_of_min']:.3f} (max abs new vs old {res['max_abs_new_vs_old']:.2e})")
            sys.stdout.flush()
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
