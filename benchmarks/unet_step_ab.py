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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("old", "new")


def export_variants(cache: Path, progress=print) -> dict[str, tuple[Path, object]]:
    """{variant: (model.onnx, unet spec)}, exporting what is not cached yet."""
    from latentrt import components as C
    from latentrt.bench.models import ensure_model

    spec = C.unet_spec(in_channels=4, out_channels=4, vae_scale_factor=8, seq_len=77, cross_attention_dim=768,
                       time_cond_proj_dim=256)
    out = {v: (cache / "unet_ab" / v / "unet" / "model.onnx", spec) for v in VARIANTS}
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


def make_engine(backend: str, path: Path, spec, threads: int, scratch: Path):
    if backend == "onnxruntime":
        from latentrt.runtime.engines.onnxruntime import OrtEngine

        return OrtEngine("unet", path, spec.inputs, spec.outputs, threads=threads, optimized_cache=False)
    from latentrt.runtime.engines.openvino import OpenVINOEngine

    return OpenVINOEngine("unet", path, spec.inputs, spec.outputs, threads=threads, precision="bf16",
                          cache_dir=scratch / path.parent.parent.name)


def inputs(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = size // 8
    return {"sample": rng.standard_normal((1, 4, n, n), dtype=np.float32),
            "timestep": np.array([499.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 768), dtype=np.float32),
            "timestep_cond": rng.standard_normal((1, 256), dtype=np.float32)}


def ab(backend: str, graphs: dict, *, rounds: int, warmup: int, threads: int, size: int, scratch: Path,
       progress=print) -> dict:
    engines = {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        engines[v] = make_engine(backend, graphs[v][0], graphs[v][1], threads, scratch)
        progress(f"{backend}: loaded {v} in {time.perf_counter() - t0:.1f}s")
    x = inputs(size)
    outs = {v: engines[v](**x)["out_sample"] for v in VARIANTS}  # first call + numerical check
    for _ in range(warmup - 1):
        for v in VARIANTS:
            engines[v](**x)
    times = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            t0 = time.perf_counter()
            engines[v](**x)
            times[v].append(time.perf_counter() - t0)
        progress(f"{backend}: round {r + 1}/{rounds}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in VARIANTS))
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    result = {"backend": backend, "precision": "fp32" if backend == "onnxruntime" else engines["new"].precision,
              "size": size, "threads": threads, "rounds": rounds,
              "median_s": med, "times_s": times, "ratio_new_over_old": med["new"] / med["old"],
              "max_abs_new_vs_old": float(np.abs(outs["new"] - outs["old"]).max())}
    del engines
    gc.collect()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="onnxruntime,openvino")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (latents size/8)")
    p.add_argument("--cache-dir", type=Path, help="default: the benchmark model cache")
    p.add_argument("--out", type=Path, help="append the results as JSON lines")
    args = p.parse_args(argv)
    from latentrt.bench.models import default_cache_dir

    cache = args.cache_dir or default_cache_dir()
    graphs = export_variants(cache)
    results = []
    with tempfile.TemporaryDirectory(prefix="unet-ab-") as scratch:
        for backend in args.backends.split(","):
            res = ab(backend, graphs, rounds=args.rounds, warmup=args.warmup, threads=args.threads, size=args.size,
                     scratch=Path(scratch))
            results.append(res)
            print(f"{backend} ({res['precision']}), {args.size}x{args.size}, batch 1, {args.threads} threads: "
                  f"old {res['median_s']['old']:.3f}s, new {res['median_s']['new']:.3f}s, new/old "
                  f"{res['ratio_new_over_old']:.3f} (max abs new vs old {res['max_abs_new_vs_old']:.2e})")
            sys.stdout.flush()
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
