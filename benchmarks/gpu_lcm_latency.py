"""End-to-end LCM 512x512, 4 steps, batch 1: latentrt's torch CUDA backend vs diffusers fp16 eager.

Both run the same random SD1.5-size weights (``latentrt.bench.models``: the SD1.5 LCM architecture
built from its published configs, nothing downloaded) in fp16 on the same GPU with the same noise
(diffusers: ``torch.Generator("cpu").manual_seed(seed)``; latentrt: ``TorchGeneratorNoise(seed)``),
``output_type="np"``, prompt encoding and VAE decode included. Each call is timed with
``torch.cuda.synchronize()`` around it (wall clock), after warm-up calls (CUDA graph capture,
cuDNN autotuning, torch.compile). The issue's target: latentrt at least 2x faster.

    python benchmarks/gpu_lcm_latency.py [--repeats 20] [--compile] [--out result.json]

The first run builds the random model into the benchmark cache (``~/.cache/latentrt/bench`` or
``--cache-dir``, once) and writes a torch-only bundle manifest for it (``--full-export`` exports the
real fp16 ONNX bundle instead: minutes of CPU work before the GPU is used).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse on the moon"


def _timed(fn, repeats: int, warmup: int):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def _stats(times):
    s = sorted(times)
    return {"median_ms": 1000 * statistics.median(s), "p90_ms": 1000 * s[min(len(s) - 1, int(0.9 * len(s)))],
            "min_ms": 1000 * s[0], "runs": len(s)}


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def torch_only_bundle(model: Path, out: Path) -> Path:
    """A bundle manifest without ONNX files, for the torch backend only (which loads the components
    from the source folder and needs just their specs, constants, tokenizer and scheduler config).
    Saves the GPU machine the CPU-side fp16 ONNX export of SD1.5 (minutes) before it can time anything;
    the ONNX Runtime and TensorRT backends refuse such a bundle (its model files do not exist)."""
    from latentrt.export.bundle import load_pipeline, tool_versions, write_support_files
    from latentrt.export.precision import FP32_INPUTS
    from latentrt.export.recipes import detect_kind
    from latentrt.manifest import ComponentEntry, Manifest

    if (out / "latentrt.json").is_file():
        return out
    pipe, source = load_pipeline(model)
    recipe = detect_kind(pipe)
    constants = recipe.constants(pipe)
    entries = {}
    for plan in recipe.components(pipe, constants):
        spec = plan.spec.with_float_dtype("float16", keep=FP32_INPUTS)
        entries[spec.name] = ComponentEntry(spec.name, f"{spec.name}/model.onnx", spec, precision="fp16")
    out.mkdir(parents=True, exist_ok=True)
    write_support_files(pipe, out, recipe.kind)
    m = Manifest(pipeline=recipe.kind, components=entries, constants=constants, source=source, precision="fp16",
                 tools=tool_versions(), extra={"torch_only": True})
    m.write(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, help="benchmark model/bundle cache (default ~/.cache/latentrt/bench)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the latentrt torch components")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--full-export", action="store_true",
                    help="export the real fp16 ONNX bundle first (minutes of CPU work) instead of a torch-only manifest")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from diffusers import LatentConsistencyModelPipeline

    import latentrt
    from latentrt.bench.baseline import quiet_loading
    from latentrt.bench.models import ensure_bundle, ensure_model
    from latentrt.runtime.random import TorchGeneratorNoise

    quiet_loading()
    model = ensure_model("sd15-lcm", args.cache_dir)
    if args.full_export:
        bundle = ensure_bundle("sd15-lcm", "fp16", args.cache_dir)
    else:
        bundle = torch_only_bundle(model, model.parent.parent / "bundles" / "sd15-lcm-torch-only-fp16")
    call = dict(num_inference_steps=args.steps, guidance_scale=8.0, height=args.size, width=args.size,
                output_type="np")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
               "steps": args.steps, "batch": 1, "precision": "fp16"}

    ref = LatentConsistencyModelPipeline.from_pretrained(str(model), dtype=torch.float16,
                                                         safety_checker=None, requires_safety_checker=False)
    ref = ref.to("cuda")
    ref.set_progress_bar_config(disable=True)
    times, ref_img = _timed(lambda: ref(PROMPT, generator=torch.Generator("cpu").manual_seed(args.seed),
                                        **call).images, args.repeats, args.warmup)
    results["diffusers_fp16_eager"] = _stats(times)
    del ref
    torch.cuda.empty_cache()

    pipe = latentrt.load(bundle, backend="torch", device="cuda", cuda_graphs=True, compile=args.compile)
    times, img = _timed(lambda: pipe(PROMPT, generator=TorchGeneratorNoise(args.seed), **call).images,
                        args.repeats, args.warmup)
    results["latentrt_torch_cuda"] = _stats(times)
    results["latentrt_torch_cuda"]["stages_ms"] = {k: 1000 * sum(v) for k, v in pipe.last_timings.items()}
    results["compile"] = args.compile
    results["speedup"] = results["diffusers_fp16_eager"]["median_ms"] / results["latentrt_torch_cuda"]["median_ms"]
    results["image_psnr_db_vs_diffusers"] = _psnr(img, ref_img)

    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
