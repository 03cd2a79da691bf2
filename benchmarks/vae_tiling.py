"""Peak RSS and time of one VAE decode, tiled (diffusers' tiled_decode) or not, in a fresh process.

    flock /tmp/latentrt-heavy.lock python benchmarks/vae_tiling.py BUNDLE --size 2048 [--tiling] [--cap-gib 16]

BUNDLE: an SD bundle with the full-size VAE (``latentrt.bench.models.ensure_bundle("sd15-lcm")``, random
weights). Tiles: the SD VAE config's (512 px / 64 latents, overlap 0.25) unless the bundle records others.
Prints one JSON line. ``--cap-gib`` limits the address space so an untiled decode too big for the machine
fails with an allocation error instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description="Time and peak RSS of one VAE decode, tiled or not.")
    p.add_argument("bundle")
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    p.add_argument("--tiling", action="store_true", help="decode in tiles")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cap-gib", type=float, help="address-space limit of this process")
    args = p.parse_args()
    if args.cap_gib:
        cap = int(args.cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    from latentrt.runtime.bundle import Bundle
    from latentrt.runtime.vae_tiling import TileConfig, VaeOptions

    bundle = Bundle(args.bundle, verify=False)
    bundle.verify(["vae_decoder"])
    engine = bundle.engine("vae_decoder", "onnxruntime", "cpu", threads=args.threads)
    tiles = TileConfig.from_constants(bundle.constants, sample_size=bundle.constants.get("vae_tile_sample_min_size", 512),
                                      latent_size=bundle.constants.get("vae_tile_latent_min_size", 64))
    z = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8)).astype(np.float32)
    calls = []

    def run(x):
        calls.append(x.shape[2:])
        return engine(latent_sample=x)["sample"]

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    record = {"size": args.size, "tiling": args.tiling, "threads": args.threads, "cap_gib": args.cap_gib,
              "tiles": [tiles.sample_size, tiles.latent_size, tiles.overlap_factor]}
    try:
        out = VaeOptions(tiling=args.tiling, tiles=tiles).apply(run, z, "decode", lambda: tiles)
        record.update(ok=True, shape=list(out.shape))
    except Exception as e:  # the untiled decode of a big image may not fit
        record.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    record.update(seconds=round(time.perf_counter() - t0, 2), engine_calls=len(calls),
                  rss_before_gib=round(rss0, 3),
                  peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
    print(json.dumps(record), flush=True)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
