"""latentrt upscale BUNDLE IMAGE: upscale an image 2x with a latent-upscaler bundle.

``latentrt generate BUNDLE PROMPT --upscale UPSCALER`` chains a generator and the upscaler, handing the
latents over without decoding them in between; :func:`upscale_chain` is that part of ``generate``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .generate import add_runtime_args, engine_options, print_timings, progress_callback, save_images

DEFAULT_STEPS = 20  # the diffusers example's choice (the pipeline's own default is 75)
DEFAULT_GUIDANCE = 9.0  # the diffusers pipeline's default


def register(sub) -> None:
    p = sub.add_parser("upscale", help="upscale an image 2x with a latent upscaler bundle")
    p.add_argument("bundle", help="a bundle exported from a StableDiffusionLatentUpscalePipeline")
    p.add_argument("image", help="input image (PNG, JPEG, ...); sides must be multiples of the bundle's size_multiple")
    p.add_argument("--prompt", default="", help="what the image shows (default: empty)")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"num_inference_steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"guidance_scale (default {DEFAULT_GUIDANCE}; 0 ignores the prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="latentrt-out", help="output folder (default latentrt-out)")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_args(p)
    p.set_defaults(func=run)


def load_upscaler(path, args):
    import latentrt

    pipe = latentrt.load(path, backend=args.backend, device=args.device, **engine_options(args))
    kind = pipe.bundle.manifest.pipeline
    if kind != "latent_upscale":
        raise ValueError(f"{path} is a {kind!r} bundle, not a latent upscaler; export one from "
                         "stabilityai/sd-x2-latent-upscaler (StableDiffusionLatentUpscalePipeline)")
    return pipe


def upscale_kwargs(steps: int, guidance: float, negative_prompt: str | None) -> dict:
    kw = dict(num_inference_steps=steps, guidance_scale=guidance)
    if negative_prompt is not None:
        kw["negative_prompt"] = negative_prompt
    return kw


def upscale_chain(pipe, args, kw: dict, callback):
    """``generate --upscale``: the generator's latents go straight to the upscaler (one noise source)."""
    from ..runtime.pipelines.upscale import chain

    upscaler = load_upscaler(args.upscale, args)
    up_kw = upscale_kwargs(args.upscale_steps, args.upscale_guidance, args.negative_prompt)
    gen_kw = {k: v for k, v in kw.items() if k != "generator"}
    return chain(pipe, upscaler, args.prompt, generator=args.seed, output_type="pil", upscale_kwargs=up_kw,
                 callback=callback, **gen_kw)


def run(args) -> int:
    from ..runtime.image import load_image

    if args.steps is not None and args.steps < 1:  # before loading anything or drawing a progress bar
        raise ValueError(f"--steps must be a positive number of denoising steps; got {args.steps}")
    image = load_image(args.image)  # a clear error for files that are not images
    pipe = load_upscaler(args.bundle, args)
    kw = upscale_kwargs(args.steps, args.guidance, args.negative_prompt)
    cb, close = progress_callback(args.steps, not args.no_progress)
    t0 = time.perf_counter()
    try:
        out = pipe(args.prompt, image=image, generator=args.seed, output_type="pil", callback=cb, **kw)
    finally:
        close()
    total = time.perf_counter() - t0
    settings = {"prompt": args.prompt, "bundle": str(args.bundle), "image": str(args.image), **kw,
                "seed": args.seed, "backend": args.backend, "device": args.device}
    for path in save_images(out.images, Path(args.output), settings, stem="upscaled"):
        print(f"wrote {path}")
    print_timings(out.timings, total)
    return 0
