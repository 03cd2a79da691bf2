"""A/B: OpenVINO precisions on this CPU, one full-size SD1.5 (LCM) UNet step and one 512x512 VAE decode,
interleaved in one process (the order rotates each round), after one warm-up round.

    flock /tmp/latentrt-heavy.lock python benchmarks/precision_ab.py [--precisions fp32,bf16] [--rounds 3]

What ``precision="auto"`` decides by a small probe (:mod:`latentrt.runtime.engines.openvino_auto`), measured
on the real components: on an AMX-less Xeon VM bf16 is slower than fp32, on AMX or AMD EPYC faster.
Heavy (a full-size pipeline per precision): run it under the lock, alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_unet_ab import _cpu_model, step_inputs  # noqa: E402

from latentrt.bench.interleaved import append_jsonl, interleaved  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="append the result as a JSON line")
    args = p.parse_args(argv)

    import latentrt
    from latentrt.bench.models import ensure_bundle

    bundle = ensure_bundle("sd15-lcm", "fp32")
    precisions = args.precisions.split(",")
    pipes = {p: latentrt.load(bundle, backend="openvino", precision=p, threads=args.threads) for p in precisions}
    feed = step_inputs(pipes[precisions[0]], 512)
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    calls = {}
    for p, pipe in pipes.items():
        calls[f"unet_{p}"] = lambda e=pipe.engines["unet"]: e.run(dict(feed))
        calls[f"vae_decoder_{p}"] = lambda e=pipe.engines["vae_decoder"]: e(latent_sample=latents)
    res = interleaved(calls, rounds=args.rounds, warmup=1)
    res["cpu"], res["threads"] = _cpu_model(), args.threads
    print(f"{res['cpu']}, {args.threads} threads, {args.rounds} rounds: medians "
          + ", ".join(f"{k} {v:.3f}s" for k, v in res["median_s"].items()))
    append_jsonl(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
