"""A/B: one int8 component of the full-size SD1.5 (LCM) benchmark bundle on OpenVINO's CPU plugin, its
convolutions' inputs quantized with a zero point (as NNCF leaves them) against the unsigned rewrite of
:mod:`latentrt.runtime.engines.openvino_u8conv`, in one process, interleaved: blob import and inference.

    flock /tmp/latentrt-heavy.lock python benchmarks/u8conv_ab.py --component unet --rounds 5 \\
        [--out benchmarks/results/u8conv_ab.jsonl]

Both variants start from the same calibrated int8 IR, the one a ``shapes="static"`` int8 engine keeps in the
bundle's cache without the rewrite (``int8_components`` = the component, ``int8_method="full"``; calibrated on
first use, minutes), and are compiled with the engine's settings (LATENCY hint, bf16 inference hint,
``--threads``), reshaped to a text-to-image call at ``--size``. Each round imports both exported blobs, each in a new
process (what a new pipeline process does, :mod:`latentrt.runtime.engines.openvino_blobs`), and runs both; inputs are random of the right
shapes. The outputs are compared with each other and with an fp32 compile of the bundle's ONNX graph.

``--images N``: then the whole pipeline (UNet and VAE decoder int8, static shapes) makes N images of the
quality gate's prompts and seeds (:mod:`latentrt.bench.quality`) with each variant, and the fp32 pipeline the
same N (which matches diffusers fp32 within 1e-4): PSNR and mean absolute pixel error of each int8 variant
against fp32, per image.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from latentrt.bench.interleaved import append_jsonl, interleaved

#: a child process that imports one exported blob (its time includes starting Python and importing openvino, the
#: same for both variants)
IMPORT = ("import json, sys, openvino as ov; data = open(sys.argv[1], 'rb').read(); "
          "ov.Core().import_model(data, 'CPU', json.loads(sys.argv[2]))")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--component", choices=("vae_decoder", "unet"), default="unet")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--images", type=int, default=0, help="also N pipeline images per variant against fp32")
    p.add_argument("--out", help="append the result as a JSON line")
    args = p.parse_args(argv)

    import openvino as ov

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from groupnorm_ab import feeds

    from latentrt.bench.models import default_cache_dir, ensure_bundle
    from latentrt.runtime.bundle import Bundle
    from latentrt.runtime.engines import openvino_int8
    from latentrt.runtime.engines.openvino_u8conv import unsigned_conv_inputs

    bundle = Bundle(ensure_bundle("sd15-lcm", "fp32", default_cache_dir()))
    entry = bundle.manifest.components[args.component]
    inputs = feeds(entry.spec.inputs, args.size, np.random.default_rng(0))
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    core = ov.Core()
    # the int8 IR of a static-shape CPU engine (GroupNorms rewritten, full method) without the unsigned rewrite
    plain_ir = openvino_int8.int8_ir(ov, core, args.component, bundle.file(entry.path), bundle.cache_dir,
                                     bundle.component_sha(args.component), bundle, None, args.threads,
                                     progress=print, method="full", groupnorm=True, unsigned=False)
    config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads}

    blobs, outs, rewritten, compile_s = {}, {}, 0, {}
    for name in ("zero_point", "unsigned"):
        model = core.read_model(str(plain_ir))
        if name == "unsigned":
            rewritten = unsigned_conv_inputs(model)
        model.reshape(shapes)
        t0 = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        compile_s[name] = time.perf_counter() - t0
        blobs[name] = compiled.export_model().getvalue()
        request = compiled.create_infer_request()
        request.infer(inputs)
        outs[name] = request.get_output_tensor(0).data.copy()
        del compiled, request

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, blob in blobs.items():
            paths[name] = Path(tmp) / f"{name}.blob"
            paths[name].write_bytes(blob)

        def importer(name):  # a new process, as a new pipeline process would import it
            def run():
                subprocess.run([sys.executable, "-c", IMPORT, str(paths[name]), json.dumps(config)], check=True)
            return run

        imports = interleaved({n: importer(n) for n in blobs}, rounds=args.rounds, warmup=0)
    requests = {n: core.import_model(b, "CPU", config).create_infer_request() for n, b in blobs.items()}
    res = interleaved({n: (lambda r=r: r.infer(inputs)) for n, r in requests.items()}, rounds=args.rounds,
                      warmup=args.warmup)
    reference = core.compile_model(str(bundle.file(entry.path)), "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})
    ref_request = reference.create_infer_request()
    ref_request.infer(inputs)
    ref = ref_request.get_output_tensor(0).data.copy()

    def diff(a, b):
        return {"max_abs": float(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean())}

    del requests, reference, ref_request
    quality = pipeline_quality(bundle.path, args) if args.images else None

    m, mi = res["median_s"], imports["median_s"]
    record = {"component": args.component, "size": args.size, "threads": args.threads, "rounds": args.rounds,
              "convolutions_rewritten": rewritten, "compile_s": compile_s, "import": imports, "infer": res,
              "import_ratio_median": mi["unsigned"] / mi["zero_point"], "infer_ratio_median": m["unsigned"] / m["zero_point"],
              "unsigned_vs_zero_point": diff(outs["unsigned"], outs["zero_point"]),
              "vs_fp32": {n: diff(o, ref) for n, o in outs.items()}, "int8_ir": str(plain_ir), "images": quality,
              "openvino": ov.__version__}
    print(f"{args.component} int8, static {args.size}x{args.size}, {args.threads} threads, {args.rounds} rounds "
          f"({rewritten} convolutions rewritten): import zero point {mi['zero_point']:.3f}s, unsigned "
          f"{mi['unsigned']:.3f}s ({record['import_ratio_median']:.3f}x); infer {m['zero_point']:.3f}s vs "
          f"{m['unsigned']:.3f}s ({record['infer_ratio_median']:.3f}x); vs fp32 mean abs "
          f"{record['vs_fp32']['zero_point']['mean_abs']:.4g} / {record['vs_fp32']['unsigned']['mean_abs']:.4g}")
    if quality:
        for n, q in quality.items():
            print(f"pipeline, {args.images} images, {n} vs fp32: PSNR min {q['psnr_min_db']:.2f} dB, mean "
                  f"{q['psnr_mean_db']:.2f} dB; mean abs pixel error max {q['mean_abs_error_255_max']:.2f}/255")
    append_jsonl(args.out, record)
    return 0


def pipeline_quality(bundle_path, args) -> dict:
    """PSNR / mean absolute pixel error against the fp32 pipeline of ``args.images`` images per int8 variant."""
    import gc

    import latentrt
    from latentrt.bench.quality import PROMPTS, SEED_OFFSET, gate_result
    from latentrt.runtime.engines import openvino as ov_engine

    def images(precision, unsigned=True):
        kw = dict(int8_components=("unet", "vae_decoder"), int8_method="full") if precision == "int8" else {}
        real = ov_engine.int8_ir
        if not unsigned:  # the engine's int8 IR as it was before the rewrite (the same calibration)
            ov_engine.int8_ir = lambda *a, **k: real(*a, **{**k, "unsigned": False})
        try:
            pipe = latentrt.load(bundle_path, backend="openvino", precision=precision, shapes="static",
                                 threads=args.threads, **kw)
            out = [pipe(PROMPTS[i % len(PROMPTS)], height=args.size, width=args.size, num_inference_steps=4,
                        guidance_scale=8.0, generator=SEED_OFFSET + i, output_type="np").images
                   for i in range(args.images)]
        finally:
            ov_engine.int8_ir = real
        del pipe
        gc.collect()
        return out

    reference = images("fp32")
    result = {}
    for name, unsigned in (("zero_point", False), ("unsigned", True)):
        got = images("int8", unsigned)
        result[name] = gate_result(np.concatenate(got), np.concatenate(reference), 30.0)
    return result


if __name__ == "__main__":
    sys.exit(main())
