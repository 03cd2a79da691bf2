"""A/B: one component of the full-size SD1.5 (LCM) benchmark bundle on OpenVINO's CPU plugin, its GroupNorms as
exported (Reshape -> MVN, which makes the plugin reorder the tensor around every GroupNorm) against the
channels-last rewrite of :mod:`latentrt.runtime.engines.openvino_groupnorm`, in one process, interleaved.

    flock /tmp/latentrt-heavy.lock python benchmarks/groupnorm_ab.py --component vae_decoder --precision bf16 \\
        --shapes static --rounds 7 [--out benchmarks/results/groupnorm_ab.jsonl]

Both variants are compiled from the bundle's own ONNX graph with the engine's settings (LATENCY hint, the
precision's inference hint, ``--threads``), at the ``--size`` of a text-to-image call (static: reshaped to it;
dynamic: as exported). Inputs are random of the right shapes (the time does not depend on their values); the
rewritten model's output is compared with the plain one's and both with an fp32 compile of the plain graph.
``--shapes engine`` compares what the engine compiles for each ``shapes`` option: "plain" is the exported graph with
dynamic shapes (``shapes="dynamic"``), "rewritten" the rewritten graph reshaped to the call (``shapes="static"``).
``--model`` picks the benchmark bundle (``sdxl-lcm``: the fp16 LCM-SDXL bundle, ``--size 1024``). Both variants stay
compiled for the interleaved rounds: two SDXL UNets do not fit in 24 GiB (killed for memory at 24.2 GB RSS); measure
the SDXL UNet through the pipeline instead (``benchmarks/scenarios/sdxl_openvino_shapes.toml``, one process each).
``--precision int8``: the two calibrated int8 IRs of the component that the engine keeps in the bundle's cache
(``int8_components`` = the component, ``int8_method="full"``): a static-shape engine's, quantized after the
rewrite, and a dynamic-shape engine's, quantized without it (each calibrated on first use, minutes), both
compiled at ``--shapes`` with the int8 precision's bf16 hint.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from latentrt.bench.interleaved import append_jsonl, interleaved

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}


def feeds(specs, size: int, rng) -> dict:
    """Random inputs of a text-to-image call at ``size`` x ``size``, batch 1, from the manifest's input specs
    (a UNet's ``timestep`` mid-schedule, 499)."""
    from latentrt.spec import SymDim

    sizes = {"B": 1, "H": size, "W": size}
    out = {s.name: rng.standard_normal([d if isinstance(d, int) else SymDim.parse(d).evaluate(sizes)
                                        for d in s.shape]).astype(s.dtype) for s in specs}
    if "timestep" in out:
        out["timestep"][...] = 499.0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--component", choices=("vae_decoder", "unet"), default="vae_decoder")
    p.add_argument("--precision", choices=tuple(HINTS), default="bf16")
    p.add_argument("--shapes", choices=("static", "dynamic", "engine"), default="static",
                   help="engine: plain with dynamic shapes against rewritten with static shapes, as the engine does")
    p.add_argument("--model", default="sd15-lcm", help="benchmark model (sd15-lcm: fp32 bundle; sdxl-lcm, "
                   "ssd-1b-lcm: fp16 bundles)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the fp32 compile that the outputs are compared with (it holds fp32 weights)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", help="append the result as a JSON line")
    args = p.parse_args(argv)

    import openvino as ov

    from latentrt.bench.models import default_cache_dir, ensure_bundle
    from latentrt.runtime.bundle import Bundle
    from latentrt.runtime.engines.openvino_f16 import as_f32_with_f16_weights, is_f16_graph
    from latentrt.runtime.engines.openvino_groupnorm import rewrite_group_norms

    bundle = Bundle(ensure_bundle(args.model, "fp32" if args.model.startswith("sd15") else "fp16", default_cache_dir()))
    entry = bundle.manifest.components[args.component]
    onnx = str(bundle.file(entry.path))
    inputs = feeds(entry.spec.inputs, args.size, np.random.default_rng(0))
    core = ov.Core()

    int8_irs = {}
    if args.precision == "int8":  # the engine's own calibrated IRs: static shapes -> rewritten, dynamic -> plain
        for rewrite, shapes in ((True, "static"), (False, "dynamic")):
            engine = bundle.engine(args.component, "openvino", precision="int8", threads=args.threads, shapes=shapes,
                                   int8_components=args.component, int8_method="full")
            int8_irs[rewrite] = str(engine.cache_path)
            del engine

    def compiled(rewrite: bool, hint: str):
        if args.precision == "int8" and hint != "f32":
            model = core.read_model(int8_irs[rewrite])
            n = sum(op.get_friendly_name().endswith("/groupnorm_nhwc") for op in model.get_ordered_ops())
        else:
            model = core.read_model(onnx)
            if is_f16_graph(model):
                model, _ = as_f32_with_f16_weights(model)
            n = rewrite_group_norms(model) if rewrite else 0
        if args.shapes == "static" or (args.shapes == "engine" and rewrite):
            model.reshape({k: list(v.shape) for k, v in inputs.items()})
        t0 = time.perf_counter()
        request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                                    "INFERENCE_NUM_THREADS": args.threads}).create_infer_request()
        return request, n, time.perf_counter() - t0

    def output(request):
        request.infer(inputs)
        return request.get_output_tensor(0).data.copy()

    reference = None if args.no_reference else output(compiled(False, "f32")[0])
    variants, outs, rewritten, compile_s = {}, {}, 0, {}
    for name, rewrite in (("plain", False), ("rewritten", True)):
        request, n, compile_s[name] = compiled(rewrite, HINTS[args.precision])
        variants[name], outs[name] = request, output(request)
        rewritten = max(rewritten, n)
    res = interleaved({v: (lambda r=r: r.infer(inputs)) for v, r in variants.items()}, rounds=args.rounds,
                      warmup=args.warmup)

    def diff(a, b):
        return {"max_abs": float(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean())}

    m = res["median_s"]
    res.update({"component": args.component, "precision": args.precision, "shapes": args.shapes, "size": args.size,
                "threads": args.threads, "rounds": args.rounds, "groupnorms_rewritten": rewritten,
                "compile_s": compile_s, "int8_irs": {("rewritten" if k else "plain"): v for k, v in int8_irs.items()}, "ratio_median": m["rewritten"] / m["plain"],
                "rewritten_vs_plain": diff(outs["rewritten"], outs["plain"]),
                "vs_fp32": None if reference is None else {v: diff(o, reference) for v, o in outs.items()},
                "model": args.model, "openvino": ov.__version__})
    print(f"{args.component}, {args.precision}, {args.shapes} shapes, {args.size}x{args.size}, {args.threads} threads, "
          f"{args.rounds} rounds: plain {m['plain']:.3f}s, rewritten {m['rewritten']:.3f}s "
          f"({res['ratio_median']:.3f}x; {rewritten} GroupNorms rewritten); rewritten vs plain mean abs "
          f"{res['rewritten_vs_plain']['mean_abs']:.3g}" + ("" if reference is None else
          f"; vs fp32 mean abs plain {res['vs_fp32']['plain']['mean_abs']:.3g}, "
          f"rewritten {res['vs_fp32']['rewritten']['mean_abs']:.3g}"))
    append_jsonl(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
