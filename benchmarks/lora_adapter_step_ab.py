"""A/B: one UNet step of the full-size SD1.5 (LCM) architecture with a LoRA fused into the weights
("fused", ``latentrt export --lora``, the default) against the same LoRA kept as an unfused branch
with a ``lora_scales`` graph input ("adapter", ``--lora-mode adapter``).

The UNet is the cached random-weight SD1.5 LCM UNet of :mod:`latentrt.bench.models` (the SD1.5 UNet
plus LCM's guidance embedding); the LoRA is random, rank ``--rank`` (default 16, alpha = rank) on the
usual attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every self- and
cross-attention: 128 layers), added with diffusers' ``add_adapter``. The adapter graph is exported
first (PEFT layers replaced by :class:`latentrt.export.lora_adapter.LoraBranch`), then the same
branches are merged into the base weights and the fused graph exported, into
``<cache>/lora_ab/r<rank>/{fused,adapter}/unet/model.onnx`` (fp32, kept for later runs). Each
backend loads both graphs in one process and times them interleaved (ABAB, BABA, ...) after
warm-up calls; the report gives the median and the fastest step per graph and the ratio
adapter/fused.

    flock /tmp/latentrt-heavy.lock python benchmarks/lora_adapter_step_ab.py --rounds 6

Heavy (a 3.4 GB UNet exported twice on the first run, two sessions per backend): run it under the
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

VARIANTS = ("fused", "adapter")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _specs(config: dict, n_loras: int = 1):
    from latentrt import components as C

    base = C.unet_spec(in_channels=config["in_channels"], out_channels=config["out_channels"], vae_scale_factor=8,
                       seq_len=77, cross_attention_dim=config["cross_attention_dim"],
                       time_cond_proj_dim=config["time_cond_proj_dim"])
    adapter = C.ComponentSpec("unet", (*base.inputs, C.TensorSpec("lora_scales", "float32", (n_loras,))), base.outputs)
    return {"fused": base, "adapter": adapter}


def export_variants(cache: Path, rank: int, model: str = "sd15-lcm", progress=print) -> dict[str, tuple[Path, object]]:
    from latentrt.bench.models import ensure_model

    src = ensure_model(model, progress=progress)
    config = json.loads((src / "unet" / "config.json").read_text())
    specs = _specs(config)
    out = {v: (cache / "lora_ab" / f"{model}-r{rank}" / v / "unet" / "model.onnx", specs[v]) for v in VARIANTS}
    if all(p.is_file() for p, _ in out.values()):
        return out
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from latentrt.export.lora_adapter import LoraBranch, LoraScaleHolder, LoraScalesInput, _replace_peft_layers
    from latentrt.export.onnx_export import ExportOptions, export_component
    from latentrt.export.wrappers import UNetWrapper

    unet = UNet2DConditionModel.from_pretrained(str(src / "unet"), dtype=torch.float32).eval()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS),
                     adapter_name="lora0")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in unet.modules():
            if hasattr(m, "lora_B") and "lora0" in m.lora_B:
                w = m.lora_B["lora0"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.01)
    holder = LoraScaleHolder()
    _replace_peft_layers(unet, ["lora0"], holder, "unet")
    branches = [m for m in unet.modules() if isinstance(m, LoraBranch)]
    progress(f"rank-{rank} LoRA on {len(branches)} attention projections")
    names = [s.name for s in specs["fused"].inputs]
    ranges = {"timestep": (0, 999), "timestep_cond": (-1, 1), "lora_scales": (1, 1)}

    def export(v, module):
        root = out[v][0].parent.parent
        root.mkdir(parents=True, exist_ok=True)
        progress(f"exporting the {v} UNet graph to {root}")
        t0 = time.perf_counter()
        export_component(module, specs[v], root / "unet", export_sizes={"B": 1, "H": 512, "W": 512}, check_sizes=[],
                         bundle_root=root, options=ExportOptions(check=False, progress=progress, value_ranges=ranges))
        progress(f"  {time.perf_counter() - t0:.0f}s")

    if not out["adapter"][0].is_file():
        export("adapter", LoraScalesInput(UNetWrapper(unet, names), len(names), holder))
    if not out["fused"][0].is_file():
        with torch.no_grad():  # merge each branch at factor 1 (alpha = rank) into its Linear, as fuse_lora does
            for parent in list(unet.modules()):
                for attr, child in list(parent.named_children()):
                    if isinstance(child, LoraBranch):
                        child.base_layer.weight += (child.up * child.rank_factor) @ child.down
                        setattr(parent, attr, child.base_layer)
        export("fused", UNetWrapper(unet, names))
    del unet
    gc.collect()
    return out


def inputs(spec, size: int, batch: int) -> dict[str, np.ndarray]:
    from latentrt.spec import concrete_shape

    rng = np.random.default_rng(0)
    out = {s.name: rng.standard_normal(concrete_shape(s, {"B": batch, "H": size, "W": size})).astype(np.float32)
           for s in spec.inputs}
    out["timestep"] = np.full(batch, 499.0, np.float32)
    return out


def ab(backend: str, graphs: dict, *, rounds: int, warmup: int, threads: int, size: int, batch: int, scratch: Path,
       progress=print) -> dict:
    engines = unet_step_engines(backend, {v: graphs[v] for v in VARIANTS}, threads, scratch, progress)
    x = inputs(graphs["fused"][1], size, batch)
    feeds = {"fused": x, "adapter": {**x, "lora_scales": np.ones(1, np.float32)}}
    outs = {v: engines[v](**feeds[v])["out_sample"] for v in VARIANTS}  # first call + numerical check
    timed = interleaved({v: (lambda v=v: engines[v](**feeds[v])) for v in VARIANTS}, rounds=rounds, warmup=warmup - 1,
                        progress=progress, label=f"{backend}: ")
    times, med, best = timed["times_s"], timed["median_s"], timed["min_s"]
    result = {"backend": backend, "precision": "fp32" if backend == "onnxruntime" else engines["adapter"].precision,
              "size": size, "batch": batch, "threads": threads, "rounds": rounds, "median_s": med, "min_s": best,
              "times_s": times, "ratio_adapter_over_fused": med["adapter"] / med["fused"],
              "ratio_of_min": best["adapter"] / best["fused"],
              "max_abs_adapter_vs_fused": float(np.abs(np.asarray(outs["adapter"]) - np.asarray(outs["fused"])).max())}
    engines.clear()  # free the compiled models before the next backend loads
    gc.collect()
    return result


def ort_kernel_profile(graphs: dict, *, threads: int, size: int, batch: int, runs: int = 3) -> dict:
    """ONNX Runtime's own per-node kernel times (ms per step) of each graph, interleaved: the total, and
    for the adapter graph the kernels whose nodes the fused graph does not have (the LoRA branches: their
    two MatMuls, the scale, the Add), which machine noise inflates alike but cannot hide in the total."""
    import collections

    import onnxruntime as ort

    x = inputs(graphs["fused"][1], size, batch)
    feeds = {"fused": x, "adapter": {**x, "lora_scales": np.ones(1, np.float32)}}
    sessions = {}
    for v in VARIANTS:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level, so.enable_profiling = threads, 3, True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"lora-ab-{v}")
        sessions[v] = ort.InferenceSession(str(graphs[v][0]), so, providers=["CPUExecutionProvider"])
        sessions[v].run(None, feeds[v])  # warm-up (its kernels are in the profile too: dropped below by run count)
    for _ in range(runs):
        for v in VARIANTS:
            sessions[v].run(None, feeds[v])
    by_node = {}
    for v in VARIANTS:
        trace = Path(sessions[v].end_profiling())
        nodes = collections.Counter()
        for e in json.loads(trace.read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                nodes[e["name"].removesuffix("_kernel_time")] += e["dur"] / 1e3
        trace.unlink()
        by_node[v] = {k: t / (runs + 1) for k, t in nodes.items()}
    del sessions
    gc.collect()
    # a LoraBranch's own nodes are in its scope (.../to_q/...) but not in its base layer's (.../to_q/base_layer/...)
    scopes = tuple(f"/{t}/" for t in TARGETS)
    extra = {k: t for k, t in by_node["adapter"].items() if any(sc in k for sc in scopes) and "/base_layer/" not in k}
    total = {v: sum(by_node[v].values()) for v in VARIANTS}
    return {"total_ms": total, "adapter_only_ms": sum(extra.values()), "adapter_only_nodes": len(extra),
            "adapter_only_share": sum(extra.values()) / total["adapter"],
            "adapter_only_examples": sorted(extra)[:8]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="onnxruntime,openvino")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (latents size/8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--op-profile", action="store_true",
                   help="also report ONNX Runtime's kernel time of each graph and of the adapter graph's own nodes")
    p.add_argument("--cache-dir", type=Path, help="default: the benchmark model cache")
    p.add_argument("--model", default="sd15-lcm", help="benchmark model (latentrt.bench.models); tiny-lcm to try it")
    p.add_argument("--out", type=Path, help="append the results as JSON lines")
    args = p.parse_args(argv)
    from latentrt.bench.models import default_cache_dir

    graphs = export_variants(args.cache_dir or default_cache_dir(), args.rank, args.model)
    results = []
    with tempfile.TemporaryDirectory(prefix="lora-ab-") as scratch:
        for backend in args.backends.split(","):
            res = ab(backend, graphs, rounds=args.rounds, warmup=args.warmup, threads=args.threads, size=args.size,
                     batch=args.batch, scratch=Path(scratch))
            res["rank"] = args.rank
            results.append(res)
            res["model"] = args.model
            if args.op_profile and backend == "onnxruntime":
                prof = res["op_profile"] = ort_kernel_profile(graphs, threads=args.threads, size=args.size,
                                                              batch=args.batch)
                print(f"  onnxruntime kernels per step: fused {prof['total_ms']['fused']:.0f} ms, adapter "
                      f"{prof['total_ms']['adapter']:.0f} ms, of which {prof['adapter_only_ms']:.0f} ms "
                      f"({100 * prof['adapter_only_share']:.2f}%) in the {prof['adapter_only_nodes']} nodes of the "
                      "LoRA branches")
            print(f"{backend} ({res['precision']}), {args.model} UNet + rank-{args.rank} LoRA on its attention projections, "
                  f"{args.size}x{args.size}, batch {args.batch}, {args.threads} threads: fused "
                  f"{res['median_s']['fused']:.3f}s, adapter {res['median_s']['adapter']:.3f}s, adapter/fused "
                  f"{res['ratio_adapter_over_fused']:.3f}; fastest fused {res['min_s']['fused']:.3f}s, adapter "
                  f"{res['min_s']['adapter']:.3f}s, adapter/fused {res['ratio_of_min']:.3f} "
                  f"(max abs adapter vs fused {res['max_abs_adapter_vs_fused']:.2e})")
            sys.stdout.flush()
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
