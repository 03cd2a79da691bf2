"""The UNet and VAE decoder against the floor, op type by op type: OpenVINO's per-op counters of one
call (:mod:`latentrt.bench.opprofile`) next to the FLOPs of the same ops counted on the source model, and
the rate OpenVINO's own matrix multiply reaches on this CPU at the same precision.

    python -m latentrt.bench.opfloor BUNDLE [--height 512 --width 512 --precision bf16 --threads 2]

FLOPs (2 per multiply-add) are counted with forward hooks on the diffusers modules of the folder the
bundle was exported from, one call at the profiled size: ``Conv2d`` by kernel size (3x3 and 1x1, as
OpenVINO names its kernels), ``Linear`` (OpenVINO's FullyConnected) and the attention core of every
``Attention`` module (Q K^T and the attention-weighted V: ``4 * batch * Nq * Nk * inner_dim``), which
OpenVINO runs inside its fused ``Subgraph`` ops (together with elementwise chains, so that row's rate is
a lower bound on the attention's). The floor is a bf16 (or fp32) MatMul of 2048 x 2048 compiled by
OpenVINO with the same threads: what its kernels reach on dense GEMM here. Prints JSON; the report
(benchmarks/RESULTS.md) quotes it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

#: OpenVINO (op type, kernel substring) -> FLOP category; first match wins
CATEGORIES = (
    ("Convolution", "1x1", "conv1x1"),
    ("Convolution", "", "conv3x3"),
    ("FullyConnected", "", "linear"),
    ("Subgraph", "", "attention"),
    ("MHA", "", "attention"),
    ("ScaledDotProductAttention", "", "attention"),
)


def category(op: str, kernel: str) -> str | None:
    for name, part, cat in CATEGORIES:
        if op == name and part in kernel:
            return cat
    return None


def count_flops(module, run) -> dict[str, int]:
    """FLOPs per category of one ``run()`` of torch ``module`` (forward hooks; see the module docstring)."""
    import torch
    from diffusers.models.attention_processor import Attention

    flops = {"conv3x3": 0, "conv1x1": 0, "linear": 0, "attention": 0}

    def conv(m, args, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        flops["conv1x1" if k == 1 else "conv3x3"] += 2 * out.numel() * (m.in_channels // m.groups) * k

    def linear(m, args, out):
        flops["linear"] += 2 * out.numel() * m.in_features

    def attention(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        if ctx is None and len(args) > 1:
            ctx = args[1]
        nq = x.shape[1] if x.ndim == 3 else x.shape[2] * x.shape[3]
        nk = nq if ctx is None else ctx.shape[1]
        flops["attention"] += 4 * x.shape[0] * nq * nk * m.to_q.out_features

    hooks = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attention, with_kwargs=True))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    return flops


def source_flops(folder: Path, height: int, width: int) -> dict[str, dict[str, int]]:
    """FLOPs per category of one UNet step and one VAE decode of the diffusers folder ``folder``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = {}
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    c = unet.config
    h, w = height // 8, width // 8
    kw = {}
    if c.time_cond_proj_dim:
        kw["timestep_cond"] = torch.zeros(1, c.time_cond_proj_dim)
    ctx = torch.zeros(1, 77, c.cross_attention_dim)
    sample = torch.zeros(1, c.in_channels, h, w)
    out["unet"] = count_flops(unet, lambda: unet(sample, 500, ctx, **kw))
    unet = None  # free it before loading the VAE
    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    out["vae_decoder"] = count_flops(vae, lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, h, w)))
    return out


def openvino_gemm_gflops(precision: str, threads: int, size: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of OpenVINO's CPU MatMul (``size`` square, constant weights, as a FullyConnected) at ``precision``.

    int8: the MatMul between FakeQuantize ops (8-bit activations, 8-bit symmetric weights), as NNCF leaves a
    quantized model, which the CPU plugin runs as an int8 FullyConnected; its rate is the FullyConnected's
    own time (PERF_COUNT), without the activations' quantization in front of it (5% of the call at 2048)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([size, size], ov.Type.f32, name="x")
    weights = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision in ("bf16", "int8") else "f32",
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision == "int8":
        def c(v):
            return ops.constant(np.float32(v))

        top = float(np.abs(weights).max())
        xq = ops.fake_quantize(x, c(-4), c(4), c(-4), c(4), 256)
        wq = ops.fake_quantize(ops.constant(weights), c(-top), c(top), c(-top), c(top), 255)
        model = ov.Model([ops.matmul(xq, wq, False, False)], [x], "gemm_int8")
        config["PERF_COUNT"] = True
    else:
        model = ov.Model([ops.matmul(x, ops.constant(weights), False, False)], [x], "gemm")
    compiled = ov.Core().compile_model(model, "CPU", config)
    req = compiled.create_infer_request()
    a = np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)
    req.infer({0: a})

    best, n, end = float("inf"), 0, time.perf_counter() + seconds
    while n < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        req.infer({0: a})
        elapsed = time.perf_counter() - t0
        best = min(best, _int8_fc_seconds(req) if precision == "int8" else elapsed)
        n += 1
    return 2.0 * size**3 / best / 1e9


def _int8_fc_seconds(req) -> float:
    """The int8 FullyConnected's own time in the last call of the int8 GEMM probe (PERF_COUNT)."""
    fc = [p for p in req.get_profiling_info() if p.node_type == "FullyConnected" and p.status == p.Status.EXECUTED]
    if not fc or "I8" not in fc[0].exec_type.upper():
        raise RuntimeError(f"OpenVINO did not run the int8 probe as an int8 FullyConnected "
                           f"({[(p.node_type, p.exec_type) for p in req.get_profiling_info()]}): no int8 floor here")
    return fc[0].real_time.total_seconds()


def floor_table(profiled: dict, flops: dict, peak_gflops: float) -> dict:
    """Per component: rows of category, seconds per call, GFLOP, GFLOP/s, share of the component's op time
    and percent of ``peak_gflops``; plus the time of the ops outside these categories."""
    out = {}
    for comp, prof in profiled.items():
        secs: dict[str, float] = {}
        other = 0.0
        for row in prof["top"]:
            cat = category(row["op"], row["kernel"])
            if cat is None:
                other += row["seconds_per_call"]
            else:
                secs[cat] = secs.get(cat, 0.0) + row["seconds_per_call"]
        total = prof["seconds_per_call"]
        rows = []
        for cat, f in flops[comp].items():
            s = secs.get(cat, 0.0)
            rate = f / s / 1e9 if s else None
            rows.append({"category": cat, "seconds_per_call": s, "gflop": f / 1e9, "gflops": rate,
                         "share": s / total if total else 0.0,
                         "percent_of_floor_rate": 100 * rate / peak_gflops if rate else None,
                         "floor_seconds": f / 1e9 / peak_gflops})
        out[comp] = {"rows": rows, "other_seconds_per_call": other, "op_seconds_per_call": total,
                     "wall_seconds_per_call": prof["wall_seconds_per_call"],
                     "floor_seconds": sum(r["floor_seconds"] for r in rows)}
    return out


def main(argv=None) -> int:
    from .models import model_folder_of
    from .opprofile import parsed_engine_options, profile, profile_arguments

    a = profile_arguments(__doc__.splitlines()[0], threads=2).parse_args(argv)
    folder = model_folder_of(Path(a.bundle))
    if folder is None:
        raise SystemExit(f"{a.bundle}: the diffusers folder it was exported from is gone; its FLOPs cannot be counted")
    peak = openvino_gemm_gflops(a.precision, a.threads)
    profiled = profile(a.bundle, height=a.height, width=a.width, steps=a.steps, precision=a.precision,
                       threads=a.threads, top=1000, engine_options=parsed_engine_options(a))
    import torch

    torch.set_num_threads(a.threads)
    flops = source_flops(folder, a.height, a.width)
    print(json.dumps({"openvino_gemm_gflops": peak, "precision": a.precision, "threads": a.threads,
                      "size": [a.height, a.width], "components": floor_table(profiled, flops, peak)}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
