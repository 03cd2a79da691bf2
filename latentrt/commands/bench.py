"""latentrt bench: latency, memory and quality of latentrt against diffusers on the same weights."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

#: command-line options that override scenario keys (None: not given)
OVERRIDES = ("model", "height", "width", "steps", "batch", "backend", "device", "precision", "vae", "threads",
             "warmup", "repeats", "guidance", "seed", "prompt", "task")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a pipeline against diffusers (JSON lines + optional report)")
    p.add_argument("--config", help="scenario TOML (benchmarks/scenarios/*.toml); without it, one scenario "
                                    "from the options below")
    p.add_argument("--scenario", action="append", help="run only this scenario of --config (repeatable)")
    p.add_argument("--model", help="sd15-lcm (full size, random weights), tiny-lcm, another name of "
                                   "latentrt.bench.models.MODELS, or a bundle folder")
    p.add_argument("--height", type=int, help="image height (default 512)")
    p.add_argument("--width", type=int, help="image width (default 512)")
    p.add_argument("--steps", type=int, help="num_inference_steps (default 4)")
    p.add_argument("--batch", type=int, help="images per call (default 1)")
    p.add_argument("--guidance", type=float, help="guidance_scale (default 8)")
    p.add_argument("--backend", help="latentrt backend (onnxruntime, torch, openvino, tensorrt)")
    p.add_argument("--device", help="device (cpu, cuda)")
    p.add_argument("--precision", help="bundle precision (fp32, fp16, ...)")
    p.add_argument("--vae", choices=["full", "tiny"], help="decode with the full VAE or TAESD")
    p.add_argument("--task", help="the pipeline: text-to-image (default), upscale (x2 latent upscaler; --height/--width "
                                  "are its output), unclip, unclip-variation")
    p.add_argument("--vae-tiling", action="store_true", help="latentrt decodes with its tiled VAE (the baseline "
                                                             "stays untiled)")
    p.add_argument("--threads", type=int, help="threads for latentrt and the baseline (default: the usable CPUs)")
    p.add_argument("--warmup", type=int, help="untimed calls before measuring (default 1)")
    p.add_argument("--repeats", type=int, help="timed calls (default 5)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--no-baseline", action="store_true", help="skip the diffusers baseline")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start / second-load measurement")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM-rate probe of the environment capture")
    p.add_argument("--no-isolated-memory", action="store_true",
                   help="skip the peak-RSS measurement of the runtime alone in a fresh process")
    p.add_argument("--isolate", action="store_true",
                   help="measure each system (latentrt, each baseline) in its own fresh process, so their memory "
                        "never adds up (full-size SDXL)")
    p.add_argument("--cache-dir", help="where benchmark models and bundles are cached "
                                       "(default $LATENTRT_BENCH_CACHE or ~/.cache/latentrt/bench)")
    p.add_argument("-o", "--output", default="bench-results.jsonl", help="JSON-lines file to append to")
    p.add_argument("--report", metavar="DIR", help="also write the Markdown/PNG report of this run's file to DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def scenarios_from_args(args):
    from ..bench.scenarios import load_scenarios, make_scenario

    over = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    if args.no_baseline:
        over["baselines"] = []
    if args.no_cold_start:
        over["cold_start"] = False
    if args.no_isolated_memory:
        over["isolated_memory"] = False
    if args.isolate:
        over["isolate"] = True
    if args.vae_tiling:
        over["vae_tiling"] = True
    if args.config:
        return load_scenarios(args.config, over, args.scenario)
    if args.scenario:
        raise ValueError("--scenario selects scenarios of a --config file; pass --config too")
    name = "cli-{}x{}-{}steps-b{}".format(over.get("height", 512), over.get("width", 512), over.get("steps", 4),
                                          over.get("batch", 1))
    return [make_scenario({"name": name, **over}, "command line")]


def run(args) -> int:
    from ..bench.harness import run_benchmarks

    scenarios = scenarios_from_args(args)
    out = Path(args.output)
    records = run_benchmarks(scenarios, out_path=out, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                             progress=not args.no_progress, gemm=not args.no_gemm,
                             log=lambda m: print(m, file=sys.stderr))
    for r in records:
        if r["type"] == "result":
            print(f"{r['scenario']:<28} {r['system']:<10} {r['vae']:<5} median {r['e2e']['median']:.3f}s "
                  f"p90 {r['e2e']['p90']:.3f}s p99 {r['e2e']['p99']:.3f}s")
    print(f"wrote {out}")
    if args.report:
        from ..bench.report import write_report

        md = write_report([out], args.report, command="latentrt " + " ".join(map(shlex.quote, sys.argv[1:])))
        print(f"wrote {md}")
    return 0
