"""latentrt generate BUNDLE PROMPT: text-to-image, or image-to-image with --image/--strength."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def add_runtime_args(p) -> None:
    """Options shared by every command that loads a bundle."""
    p.add_argument("--backend", default="onnxruntime",
                   help="onnxruntime (default), torch, tensorrt or openvino (CPU fast path: bf16 on "
                        "AVX512-BF16/AMX CPUs; LATENTRT_OPENVINO_PRECISION=fp32 for full precision)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or tensorrt (onnxruntime EP)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the CPUs available)")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. precision=bf16 for openvino (repeatable)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode (and encode) with the VAE in overlapping tiles, as diffusers' enable_vae_tiling: "
                        "bounded memory for big images (the image differs slightly at the seams)")
    p.add_argument("--vae-slicing", action="store_true", help="run the VAE on one image of the batch at a time")


def vae_kwargs(args) -> dict:
    """The call arguments of --vae-tiling / --vae-slicing (only when given: the pipeline's defaults otherwise)."""
    return {f"vae_{k}": True for k in ("tiling", "slicing") if getattr(args, f"vae_{k}", False)}


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def engine_options(args) -> dict:
    from .export import parse_pairs

    opts = {k: _option_value(v) for k, v in parse_pairs(getattr(args, "engine_option", []), "--engine-option").items()}
    if getattr(args, "threads", None):
        opts["threads"] = args.threads
    return opts


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a bundle")
    p.add_argument("bundle", help="a bundle folder written by `latentrt export`")
    p.add_argument("prompt", help="what the image should show")
    p.add_argument("--image", help="input image for image-to-image")
    p.add_argument("--strength", type=float, default=0.8, help="image-to-image strength in (0, 1] (default 0.8)")
    p.add_argument("--steps", type=int, help="num_inference_steps (default: the pipeline's, 4 for LCM, 50 for SD)")
    p.add_argument("--guidance", type=float,
                   help="guidance_scale (default: the pipeline's, 8.5 for LCM, 7.5 for SD; <= 1 turns CFG off)")
    p.add_argument("--negative-prompt", help="what the image should not show (used with guidance > 1)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the bundle's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the bundle's)")
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scheduler", help="diffusers scheduler class name to use instead of the bundle's")
    p.add_argument("--clip-skip", type=int, help="use the text encoder's hidden state this many layers from the end")
    p.add_argument("-o", "--output", default="latentrt-out", help="output folder (default latentrt-out)")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="do not run the bundle's safety checker (by default it runs when the bundle has one and "
                        "flagged images are saved black)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tiny-vae", action="store_true", help="decode (and encode) with the bundle's TAESD instead of the full VAE")
    p.add_argument("--upscale", metavar="UPSCALER_BUNDLE",
                   help="upscale 2x with a latent upscaler bundle, handing it the latents (no decode in between)")
    p.add_argument("--upscale-steps", type=int, default=20, help="the upscaler's num_inference_steps (default 20)")
    p.add_argument("--upscale-guidance", type=float, default=9.0,
                   help="the upscaler's guidance_scale (default 9; 0 ignores the prompt)")
    p.add_argument("--freeu", metavar="S1,S2,B1,B2",
                   help="FreeU factors, as diffusers' enable_freeu (e.g. 0.9,0.2,1.5,1.6 for SD1.5); the bundle must be "
                        "exported with --freeu")
    add_control_args(p)
    from .ip_adapter_args import add_ip_adapter_args

    add_ip_adapter_args(p)  # --ip-image / --ip-scale (IP-Adapter bundles)
    add_runtime_args(p)
    p.set_defaults(func=run)


def add_control_args(p) -> None:
    """ControlNet / T2I-Adapter options (bundles exported with --controlnet / --adapter)."""
    p.add_argument("--control-image", action="append", default=[], metavar="PNG",
                   help="conditioning image (edges, pose, depth...); repeat once per ControlNet, in the bundle's order")
    p.add_argument("--control-scale", metavar="S[,S...]",
                   help="controlnet_conditioning_scale (adapter_conditioning_scale for an adapter bundle): one "
                        "number or one per ControlNet")
    p.add_argument("--control-start", metavar="F[,F...]", help="control_guidance_start (default 0)")
    p.add_argument("--control-end", metavar="F[,F...]", help="control_guidance_end (default 1)")
    p.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode")
    p.add_argument("--adapter-factor", type=float, help="adapter_conditioning_factor (default 1)")
    p.add_argument("--canny", metavar="LOW,HIGH",
                   help="turn each --control-image (a photo) into a Canny edge map first, e.g. --canny 100,200")


def _numbers(text: str | None):
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"expected a number or comma-separated numbers; got {text!r}") from None
    return values[0] if len(values) == 1 else values


def control_kwargs(args, pipe) -> dict:
    """The pipeline's conditioning keyword arguments from the --control-* options."""
    if not args.control_image:
        if any(getattr(args, k) not in (None, False) for k in ("control_scale", "control_start", "control_end",
                                                              "guess_mode", "adapter_factor", "canny")):
            raise SystemExit("--control-scale/--control-start/--control-end/--guess-mode/--adapter-factor/--canny "
                             "need --control-image")
        return {}
    from PIL import Image

    images = [Image.open(path) for path in args.control_image]
    if args.canny:
        from ..runtime.control import canny_image

        lo, hi = _numbers(args.canny) if "," in args.canny else (None, None)
        if lo is None:
            raise SystemExit(f"--canny takes LOW,HIGH thresholds, e.g. 100,200; got {args.canny!r}")
        images = [canny_image(i, lo, hi) for i in images]
    adapter = "adapter" in (pipe.bundle.manifest.extra.get("control") or {})
    kw = {"control_image": images[0] if len(images) == 1 else images}
    scale = _numbers(args.control_scale)
    if scale is not None:
        kw["adapter_conditioning_scale" if adapter else "controlnet_conditioning_scale"] = scale
    for key, value in (("control_guidance_start", _numbers(args.control_start)),
                       ("control_guidance_end", _numbers(args.control_end)),
                       ("adapter_conditioning_factor", args.adapter_factor)):
        if value is not None:
            kw[key] = value
    if args.guess_mode:
        kw["guess_mode"] = True
    return kw


def call_kwargs(args) -> dict:
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
              generator=args.seed, height=args.height, width=args.width, clip_skip=args.clip_skip,
              scheduler=args.scheduler, vae="tiny" if getattr(args, "tiny_vae", False) else None)
    if args.negative_prompt is not None:
        kw["negative_prompt"] = args.negative_prompt
    kw.update(vae_kwargs(args))
    if getattr(args, "freeu", None) is not None:  # latentrt.runtime.pipelines.freeu
        from ..runtime.pipelines.freeu import check_freeu

        kw["freeu"] = check_freeu(args.freeu)
    return {k: v for k, v in kw.items() if v is not None}


def progress_callback(total: int, enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
    return (lambda i, t, latents: bar.update(1)), bar.close


def save_images(images, out_dir: Path, settings: dict, stem: str = "image") -> list[Path]:
    from PIL.PngImagePlugin import PngInfo

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = PngInfo()
    meta.add_text("latentrt", json.dumps(settings, sort_keys=True))
    paths = []
    for k, img in enumerate(images):
        path = out_dir / f"{stem}-{settings.get('seed', 0)}-{k}.png"
        img.save(path, pnginfo=meta)
        paths.append(path)
    return paths


def print_timings(timings: dict, total: float, file=None) -> None:
    file = file or sys.stdout  # looked up per call: sys.stdout may have been replaced since import
    for stage, times in timings.items():
        detail = f" ({len(times)} calls, {1000 * sum(times) / len(times):.1f} ms each)" if len(times) > 1 else ""
        print(f"  {stage:<14} {1000 * sum(times):9.1f} ms{detail}", file=file)
    print(f"  {'total':<14} {1000 * total:9.1f} ms", file=file)


def _default_arg(pipe, name: str):
    """The default of a pipeline call argument (so the CLI's defaults are each pipeline's own)."""
    import inspect

    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def run(args) -> int:
    import inspect

    import latentrt

    if args.steps is not None and args.steps < 1:  # before loading anything or drawing a progress bar
        raise ValueError(f"--steps must be a positive number of denoising steps; got {args.steps}")
    image = None
    if args.image:
        from ..runtime.image import load_image

        image = load_image(args.image)  # a clear error for files that are not images
    pipe = latentrt.load(args.bundle, backend=args.backend, device=args.device, **engine_options(args))
    kw = call_kwargs(args)
    if image is not None:
        kw.update(image=image)
        if "strength" in inspect.signature(pipe.__call__).parameters:  # unCLIP variations have no strength
            kw["strength"] = args.strength
    control = control_kwargs(args, pipe)
    from .ip_adapter_args import ip_adapter_kwargs, ip_adapter_settings

    ip = ip_adapter_kwargs(args)
    if getattr(args, "no_safety_checker", False) and "safety_checker" in inspect.signature(pipe.__call__).parameters:
        kw["safety_checker"] = False
    n = args.steps or _default_arg(pipe, "num_inference_steps")
    try:
        if hasattr(pipe, "plan"):  # the pipeline knows how it cuts the schedule (SD image-to-image)
            steps = len(pipe.plan(n, strength=kw.get("strength", 1.0), scheduler=args.scheduler))
        else:
            steps = len(pipe.get_scheduler(args.scheduler).plan(n, strength=kw.get("strength", 1.0)))
    except (AttributeError, TypeError, ValueError):  # pipelines whose loop is not one scheduler plan
        steps = None
    cb, close = progress_callback(steps, not args.no_progress)
    t0 = time.perf_counter()
    try:
        if getattr(args, "upscale", None) and (control or ip):
            raise SystemExit("--upscale does not take --control-image or --ip-image yet; generate first, then "
                             "`latentrt upscale`")
        if getattr(args, "upscale", None):  # generator -> latents -> upscaler (latentrt.commands.upscale)
            from .upscale import upscale_chain

            out = upscale_chain(pipe, args, kw, cb)
        else:
            out = pipe(args.prompt, output_type="pil", callback=cb, **kw, **control, **ip)
    finally:
        close()
    total = time.perf_counter() - t0
    settings = {"prompt": args.prompt, "bundle": str(args.bundle), **{k: v for k, v in kw.items() if k != "image"},
                "seed": args.seed, "image": args.image, "backend": args.backend, "device": args.device,
                **({k: v for k, v in control.items() if k != "control_image"} if control else {}),
                **({"control_image": args.control_image, "canny": args.canny} if control else {}),
                **ip_adapter_settings(args)}
    flags = getattr(out, "nsfw_content_detected", None) or []
    for i, path in enumerate(save_images(out.images, Path(args.output), settings)):
        print(f"wrote {path}" + (" (black: the safety checker flagged it; --no-safety-checker turns it off)"
                                 if i < len(flags) and flags[i] else ""))
    print_timings(out.timings, total)
    return 0
