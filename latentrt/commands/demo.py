"""latentrt demo: build a tiny random LCM, export it, generate an image, print per-stage timings.

Needs the export dependencies (torch, diffusers, transformers) for the first two steps; nothing is
downloaded. The image is noise-like (random weights): the demo shows the machinery, not art.
"""

from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="tiny end-to-end run: build a tiny model, export, generate, time it")
    p.add_argument("-o", "--output", default="demo-out", help="working folder (default demo-out)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="bundle precision (default fp32)")
    p.add_argument("--steps", type=int, default=4, help="num_inference_steps (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    import latentrt
    from ..export.bundle import export_bundle
    from ..export.tiny import save_tiny_lcm
    from .generate import print_timings, save_images

    root = Path(args.output)
    t0 = time.perf_counter()
    model_dir = save_tiny_lcm(root / "tiny-lcm")
    t_build = time.perf_counter() - t0
    print(f"built tiny random LCM pipeline in {model_dir} ({t_build:.1f}s)")

    bundle = root / f"bundle-{args.precision}"
    t0 = time.perf_counter()
    export_bundle(model_dir, bundle, precision=args.precision, overwrite=True, progress=lambda m: print("  " + m))
    t_export = time.perf_counter() - t0

    t0 = time.perf_counter()
    pipe = latentrt.load(bundle)
    t_load = time.perf_counter() - t0
    pipe("warm-up", num_inference_steps=1, generator=0, output_type="np")
    prompt = "a photograph of an astronaut riding a horse"
    t0 = time.perf_counter()
    out = pipe(prompt, num_inference_steps=args.steps, guidance_scale=8.0, generator=args.seed, output_type="pil")
    t_gen = time.perf_counter() - t0
    paths = save_images(out.images, root, {"prompt": prompt, "seed": args.seed, "steps": args.steps,
                                             "bundle": str(bundle)}, stem="demo")

    img2img = pipe(prompt, image=out.images[0], strength=0.5, num_inference_steps=args.steps, generator=args.seed)
    paths += save_images(img2img.images, root, {"prompt": prompt, "seed": args.seed, "strength": 0.5}, stem="demo-img2img")

    print(f"\nexport {t_export:.1f}s, bundle load {1000 * t_load:.0f} ms")
    print(f"text-to-image, {out.images[0].size[0]}x{out.images[0].size[1]}, {args.steps} steps:")
    print_timings(out.timings, t_gen)
    for p in paths:
        print(f"wrote {p}")
    return 0
