"""A/B: one UNet step of the full-size SD1.5 (LCM) architecture on the OpenVINO backend, fp32 and bf16
against ``precision="int8"`` with each ``int8_method`` (``full``, the default: every convolution and MatMul
with int8 weights *and* activations; ``hybrid``: int8 convolutions, int8-weight MatMuls computed in bf16)
and, optionally, the full model with SmoothQuant on (``--smoothquant``), to see whether and how int8 pays
on the CPU at hand (AMX int8 tiles, or only AVX512-VNNI).

The benchmark bundle (:mod:`latentrt.bench.models`, built once) is loaded at each precision in one
process; the int8 model is calibrated once through the pipeline (4 prompts, cached in the bundle). The
inputs are those of the second step of a real 512x512 LCM call; every variant is timed interleaved
(the order rotates each round) after warm-up calls, and its output is compared with fp32's (max and
mean absolute difference); ratios are to the faster of fp32 and bf16. The kernels OpenVINO picked for the convolutions are printed per variant
(``brgconv_avx512_amx_int8`` means AMX tiles; ``*_avx512_vnni`` / ``jit_avx512_core_vnni`` means VNNI).

    flock /tmp/latentrt-heavy.lock python benchmarks/int8_unet_ab.py --rounds 8 [--smoothquant]

Heavy (4-5 full-size UNets in memory, a calibration and two or three quantizations on the first run): run it
under the lock, alone. Image quality is not judged here: the quality gate of ``latentrt bench``
(``benchmarks/scenarios/sd15_lcm_int8.toml``) does that against diffusers fp32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from latentrt.bench.interleaved import append_jsonl, interleaved


def step_inputs(pipe, size: int) -> dict:
    """The UNet's inputs at the second step of a ``size`` x ``size`` 4-step call."""
    engine, seen = pipe.engines["unet"], []
    run = engine.run
    engine.run = lambda arrays: (seen.append({k: np.array(v, copy=True) for k, v in arrays.items()}), run(arrays))[1]
    try:
        pipe("a photograph of an astronaut riding a horse", height=size, width=size, num_inference_steps=4,
             generator=0, output_type="latent")
    finally:
        engine.run = run
    return seen[1]


def smoothquant_int8_engine(pipe_float, threads: int, scratch: Path, progress=print):
    """The UNet with every MatMul and convolution quantized (weights and activations) with SmoothQuant on,
    calibrated on the same samples as the shipped methods; saved once under ``scratch``."""
    import openvino as ov

    from latentrt.runtime.engines.openvino import OpenVINOEngine
    from latentrt.runtime.engines.openvino_int8 import _import_nncf, calibration_samples, calibration_settings

    xml = scratch / "unet-int8-full.xml"
    bundle = pipe_float.bundle
    if not xml.is_file():
        nncf = _import_nncf()
        progress("quantizing the SmoothQuant int8 variant (once)")
        samples = calibration_samples(bundle, "unet", calibration_settings(bundle, None), threads)
        model = ov.Core().read_model(str(bundle.path / "unet" / "model.onnx"))
        model = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(samples))
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = scratch / "unet-int8-full.tmp.xml"
        ov.save_model(model, str(tmp), compress_to_fp16=True)
        tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        tmp.replace(xml)
    e = pipe_float.engines["unet"]
    return OpenVINOEngine("unet", xml, e.inputs, e.outputs, threads=threads, precision="auto", cache=False)


def conv_kernels(engine) -> list[str]:
    """The distinct kernels of the compiled model's convolutions and fully connected layers."""
    rt = engine.compiled.get_runtime_model()
    kinds = set()
    for op in rt.get_ordered_ops():
        info = op.get_rt_info()
        keys = set(info.keys())
        text = {k: info[k].astype(str) for k in ("layerType", "runtimePrecision", "primitiveType") if k in keys}
        if text.get("layerType") in ("Convolution", "FullyConnected"):
            kinds.add(":".join(text[k] for k in ("layerType", "runtimePrecision", "primitiveType") if k in text))
    return sorted(kinds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--smoothquant", action="store_true", help="also time the full int8 UNet with SmoothQuant on")
    p.add_argument("--cache-dir", type=Path, help="default: the benchmark model cache")
    p.add_argument("--out", type=Path, help="append the result as a JSON line")
    args = p.parse_args(argv)

    import latentrt
    from latentrt.bench.models import default_cache_dir, ensure_bundle

    cache = args.cache_dir or default_cache_dir()
    bundle = ensure_bundle("sd15-lcm", "fp32", cache)
    t0 = time.perf_counter()
    fp32 = latentrt.load(bundle, backend="openvino", precision="fp32", threads=args.threads)
    bf16 = latentrt.load(bundle, backend="openvino", precision="bf16", threads=args.threads)
    int8 = latentrt.load(bundle, backend="openvino", precision="int8", int8_method="full", threads=args.threads)
    hybrid = latentrt.load(bundle, backend="openvino", precision="int8", int8_method="hybrid", threads=args.threads)
    print(f"loaded fp32, bf16 and int8 full and hybrid (calibrated once; its other layers compute in {int8.engines['text_encoder']._config['INFERENCE_PRECISION_HINT']}) "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    feed = step_inputs(fp32, args.size)
    engines = {"fp32": fp32.engines["unet"], "bf16": bf16.engines["unet"], "int8_full": int8.engines["unet"],
               "int8_hybrid": hybrid.engines["unet"]}
    if args.smoothquant:
        engines["int8_full_smoothquant"] = smoothquant_int8_engine(fp32, args.threads, cache / "int8_ab")
    outs = {v: e.run(dict(feed))["out_sample"] for v, e in engines.items()}
    res = interleaved({v: (lambda e=e: e.run(dict(feed))) for v, e in engines.items()}, rounds=args.rounds,
                      warmup=args.warmup)
    m, b = res["median_s"], res["min_s"]
    ref = min(("fp32", "bf16"), key=lambda v: m[v])  # the faster float precision
    res.update({
        "size": args.size, "threads": args.threads, "rounds": args.rounds, "reference": ref,
        "ratio_median_vs_reference": {v: m[v] / m[ref] for v in engines},
        "ratio_min_vs_reference": {v: b[v] / b[ref] for v in engines},
        "out_vs_fp32": {v: {"max_abs": float(np.abs(outs[v] - outs["fp32"]).max()),
                            "mean_abs": float(np.abs(outs[v] - outs["fp32"]).mean())} for v in engines},
        "kernels": {v: conv_kernels(e) for v, e in engines.items()},
        "cpu": _cpu_model(),
    })
    print(f"OpenVINO UNet step, SD1.5 {args.size}x{args.size}, batch 1, {args.threads} threads, {args.rounds} rounds ("
          f"{res['cpu']}):")
    for v in engines:
        d = res["out_vs_fp32"][v]
        print(f"  {v}: median {m[v]:.3f}s ({res['ratio_median_vs_reference'][v]:.3f}x {ref}), fastest {b[v]:.3f}s "
              f"({res['ratio_min_vs_reference'][v]:.3f}x); output vs fp32 max {d['max_abs']:.3g} mean {d['mean_abs']:.3g}; "
              f"kernels {', '.join(res['kernels'][v])}")
    append_jsonl(args.out, res)
    return 0


def _cpu_model() -> str:
    from latentrt.runtime.engines.openvino_auto import cpu_flags

    model, flags = cpu_flags()
    return (f"{model or 'unknown CPU'}, AMX int8 {'yes' if 'amx_int8' in flags else 'no'}, "
            f"VNNI {'yes' if 'avx512_vnni' in flags else 'no'}")


if __name__ == "__main__":
    sys.exit(main())
