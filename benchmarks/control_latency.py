"""ControlNet latency on the CPU: SD1.5 LCM + one ControlNet against diffusers, and what a bundle's
ControlNets cost plain generation (nothing: the residual-free ``unet`` graph runs).

    python benchmarks/control_latency.py tiny                       # seconds; no lock needed
    flock /tmp/latentrt-heavy.lock python benchmarks/control_latency.py sd15 --repeats 3

Builds (once, cached with the other benchmark models) the random-weight bench model, its ControlNet
(``latentrt.bench.models.CONTROLNETS``) and the bundle with that ControlNet added to the plain bundle
(``ensure_controlnet_bundle``). Runs, interleaved per repeat: the plain bundle, the ControlNet bundle
without a control image, with one, and (``sd15``) diffusers' ``StableDiffusionControlNetPipeline`` on
the same weights (LCM UNet, LCMScheduler, fp32). Prints medians as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

MODELS = {"tiny": ("tiny-controlnet", 64), "sd15": ("sd15-controlnet-canny", 512)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LATENTRT_THREADS", 2)))
    ap.add_argument("--no-diffusers", action="store_true")
    args = ap.parse_args()

    import latentrt
    from latentrt.bench.models import (CONTROLNETS, ensure_bundle, ensure_controlnet, ensure_controlnet_bundle,
                                       ensure_model)

    name, size = MODELS[args.model]
    base = CONTROLNETS[name][1]
    plain_dir, cn_dir = ensure_bundle(base), ensure_controlnet_bundle(name)
    rng = np.random.default_rng(0)
    from PIL import Image

    control = Image.fromarray(((rng.uniform(0, 1, (size, size, 3)) > 0.9) * 255).astype(np.uint8))  # sparse edges
    kw = dict(num_inference_steps=args.steps, guidance_scale=8.0, height=size, width=size, output_type="np")

    systems = {}
    if args.model == "tiny":  # the two bundles' unet graphs are the same file (hard links) at full size
        systems["plain bundle"] = (latentrt.load(plain_dir, threads=args.threads), {})
    cn_pipe = latentrt.load(cn_dir, threads=args.threads)
    systems["ControlNet bundle, no control image"] = (cn_pipe, {})
    systems["ControlNet bundle, control image"] = (cn_pipe, {"control_image": control})
    ref = None
    if not args.no_diffusers and args.model == "sd15":
        import torch
        from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline, UNet2DConditionModel
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        torch.set_num_threads(args.threads)
        src = ensure_model(base)
        ref = StableDiffusionControlNetPipeline(
            vae=AutoencoderKL.from_pretrained(str(src / "vae")),
            text_encoder=CLIPTextModel.from_pretrained(str(src / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(str(src / "tokenizer")),
            unet=UNet2DConditionModel.from_pretrained(str(src / "unet")),
            controlnet=ControlNetModel.from_pretrained(str(ensure_controlnet(name))),
            scheduler=LCMScheduler.from_pretrained(str(src / "scheduler")),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)

    results = {k: {"e2e": [], "unet": [], "unet_controlnet": [], "controlnet_0": [], "text_encoder": [],
                   "vae_decoder": []} for k in systems}
    results["diffusers ControlNet pipeline"] = {"e2e": []}
    for r in range(args.repeats + 1):  # the first round warms up and is dropped
        items = list(systems.items())
        for label, (pipe, extra) in items[r % len(items):] + items[:r % len(items)]:  # rotate who goes first
            t0 = time.perf_counter()
            out = pipe("a house", generator=r, **kw, **extra)
            dt = time.perf_counter() - t0
            if r:
                results[label]["e2e"].append(dt)
                for stage in ("unet", "unet_controlnet", "controlnet_0", "text_encoder", "vae_decoder"):
                    results[label][stage] += out.timings.get(stage, [])
        if ref is not None:
            import torch

            t0 = time.perf_counter()
            with torch.inference_mode():
                ref("a house", image=control, generator=torch.Generator().manual_seed(r), **kw)
            if r:
                results["diffusers ControlNet pipeline"]["e2e"].append(time.perf_counter() - t0)

    def ms(v):
        return f"{1000 * statistics.median(v):.1f} ms" if v else "-"

    print(f"\n{args.model}: {size}x{size}, {args.steps} steps, {args.threads} threads, medians of {args.repeats}\n")
    print("| system | e2e | UNet step (plain graph) | UNet step (residual graph) | ControlNet step | text encoder | "
          "VAE decode |")
    print("|---|---|---|---|---|---|---|")
    for label, v in results.items():
        if v["e2e"]:
            print(f"| {label} | {ms(v['e2e'])} | {ms(v.get('unet', []))} | {ms(v.get('unet_controlnet', []))} | "
                  f"{ms(v.get('controlnet_0', []))} | {ms(v.get('text_encoder', []))} | {ms(v.get('vae_decoder', []))} |")
    if "plain bundle" in systems:
        ab = engine_ab(systems["plain bundle"][0], cn_pipe)
        print(f"\nunet engine alone, interleaved (median of 40 x 5 calls): bundle without ControlNets "
              f"{1000 * ab['without']:.2f} ms, with ControlNets (their sessions loaded) {1000 * ab['with']:.2f} ms")


def engine_ab(plain, controlled, rounds: int = 40, calls: int = 5) -> dict[str, float]:
    """The ``unet`` engine of both pipelines on the same inputs, alternating which goes first: the
    plain-generation UNet step of a bundle without and with ControlNets (after its ControlNet
    sessions exist), without the rest of the pipeline's noise."""
    spec = plain.bundle.manifest.components["unet"].spec
    rng = np.random.default_rng(0)
    from latentrt.spec import make_dummy

    k = plain.constants
    inputs = {s.name: make_dummy(s, {"B": 1, "H": k["default_height"], "W": k["default_width"]}, rng, high=999)
              for s in spec.inputs}
    inputs["timestep"] = inputs["timestep"].astype(np.float32)
    res = {"without": [], "with": []}
    for r in range(rounds):
        order = [("without", plain), ("with", controlled)]
        for key, pipe in order if r % 2 else order[::-1]:
            t0 = time.perf_counter()
            for _ in range(calls):
                pipe.engines["unet"](**inputs)
            res[key].append((time.perf_counter() - t0) / calls)
    return {key: statistics.median(v) for key, v in res.items()}


if __name__ == "__main__":
    main()
