"""latentrt export SRC -o OUT: trace a diffusers pipeline to an ONNX bundle."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("export", help="export a diffusers pipeline (hub id or local folder) to a bundle")
    p.add_argument("src", nargs="?", help="hub id (owner/name), a local diffusers folder written by save_pretrained, "
                                          "or a single-file checkpoint (.safetensors; .ckpt with --allow-pickle)")
    p.add_argument("-o", "--output", help="bundle folder to create (not with --add-to)")
    p.add_argument("--controlnet", action="append", default=[], metavar="CN",
                   help="also export a ControlNet (hub id or diffusers ControlNetModel folder) and the UNet graph "
                        "that takes its residuals; repeatable (a multi-ControlNet bundle, in this order)")
    p.add_argument("--adapter", metavar="AD", help="also export a T2I-Adapter (hub id or diffusers T2IAdapter folder)")
    p.add_argument("--ip-adapter", metavar="SOURCE",
                   help="also export an IP-Adapter (image prompts): a weight file (.safetensors; .bin with "
                        "--allow-pickle), a folder "
                        "holding one, or owner/name/[subfolder/]file on the hub, e.g. "
                        "h94/IP-Adapter/models/ip-adapter_sd15.safetensors; its image encoder comes from the "
                        "image_encoder folder beside it unless --image-encoder is given")
    p.add_argument("--image-encoder", metavar="SRC",
                   help="the IP-Adapter's CLIP image encoder (CLIPVisionModelWithProjection folder or hub id)")
    p.add_argument("--add-to", metavar="BUNDLE",
                   help="add the --controlnet(s) to this existing bundle (no -o; its UNet is not exported again; a "
                        "bundle without ControlNets also needs SRC, to export the UNet graph with residual inputs)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default=None,
                   help="precision of every component (default fp32, or the --profile's)")
    p.add_argument("--component-precision", action="append", default=[], metavar="NAME=PREC",
                   help="per-component precision, e.g. vae_decoder=fp32 (repeatable)")
    p.add_argument("--profile", help="take the per-component precision and the size range from this profile (name or "
                                     ".toml path; `latentrt profiles` lists them); --precision/--component-precision "
                                     "and --max-size/--max-batch override it")
    p.add_argument("--max-size", type=int, metavar="PIXELS",
                   help="largest image side the bundle serves (default: the profile's, else 4x the default size); "
                        "calls above it are refused before any engine runs")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="most images one call makes (default: the profile's batch maximum, else 16)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--check", choices=["full", "quick", "off"], default=None,
                   help="check each component against torch at two sizes (full, the default), one (quick) or not "
                        "at all (off: for graphs too big to run next to their torch module)")
    p.add_argument("--no-check", action="store_true", help="same as --check quick")
    p.add_argument("--trace-size", type=int, metavar="PIXELS",
                   help="trace and check at this height and width instead of the pipeline's default (graphs stay "
                        "dynamic); e.g. 256 makes a 1024x1024 SDXL export much cheaper")
    p.add_argument("--low-memory", action="store_true",
                   help="load each component in its export precision (fp16 weights for fp16 components) instead "
                        "of fp32 plus an fp16 copy; fp16 graphs are then checked against the fp16 module. "
                        "An fp16 SDXL bundle (VAE fp32, --trace-size 256, --check off) exported with a peak RSS of "
                        "20.5 GB this way (benchmarks/RESULTS.md)")
    p.add_argument("--lora", action="append", default=[], metavar="SRC[:WEIGHT[:NAME]]",
                   help="fuse a LoRA (diffusers/PEFT or kohya .safetensors; local file or folder, or hub id "
                        "owner/name[/file.safetensors]) into the UNet and text encoder before export, with WEIGHT "
                        "(default 1.0); repeatable, e.g. --lora latent-consistency/lcm-lora-sdv1-5 --lora style.safetensors:0.5. "
                        "With --lora-mode adapter, NAME (default: the file's name) is how pipe(..., lora_weights={NAME: w}) "
                        "addresses it")
    p.add_argument("--lora-mode", choices=["fused", "adapter"], default="fused",
                   help="fused (default, the fast path): LoRAs merged into the weights at their WEIGHT; adapter: kept as "
                        "unfused branches whose weights and scale are set per call (lora_weights=, "
                        "cross_attention_kwargs={'scale': s}), at some cost per step (see README)")
    p.add_argument("--vae", metavar="SRC",
                   help="replace the pipeline's VAE (AutoencoderKL: hub id or local folder), e.g. "
                        "madebyollin/sdxl-vae-fp16-fix for an all-fp16 SDXL bundle")
    p.add_argument("--tiny-vae", metavar="SRC",
                   help="also export a TAESD AutoencoderTiny (hub id such as madebyollin/taesd, or a local folder) "
                        "as an alternative VAE, used with `generate --tiny-vae` / pipe(..., vae='tiny')")
    p.add_argument("--textual-inversion", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="add a textual-inversion embedding (diffusers learned_embeds, A1111 .pt/.safetensors, SDXL "
                        "clip_l/clip_g .safetensors) as TOKEN (default: the file's own token or its name); repeatable")
    p.add_argument("--config", metavar="DIFFUSERS_FOLDER_OR_ID",
                   help="for a single-file SRC: the diffusers pipeline (local folder or hub id) whose configs and "
                        "tokenizer describe it; a local folder needs no hub access")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickled files (.pt, .bin, .ckpt), which can run code: only for files you trust")
    p.add_argument("--safety-checker", action=argparse.BooleanOptionalAction, default=None,
                   help="export diffusers' safety checker (its CLIP vision model, concept data and feature extractor) "
                        "so generated images report nsfw_content_detected and flagged ones are blacked out; default: "
                        "exported when SRC carries one (as diffusers loads it), --no-safety-checker leaves it out")
    p.add_argument("--freeu", action="store_true",
                   help="give the UNet graph a freeu input, so that generate --freeu S1,S2,B1,B2 (or freeu=(...) in "
                        "Python) applies FreeU without re-exporting")
    p.set_defaults(func=run)


def parse_pairs(pairs, what: str) -> dict[str, str]:
    out = {}
    for item in pairs:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what} takes NAME=VALUE; got {item!r}")
        out[name] = value
    return out


def run(args) -> int:
    from ..export.bundle import export_bundle
    from ..profiles import export_precision

    if getattr(args, "add_to", None):
        if args.output or args.adapter or not args.controlnet or getattr(args, "ip_adapter", None):
            raise SystemExit("latentrt export [SRC] --add-to BUNDLE takes --controlnet CN (repeatable) and no -o, "
                             "--adapter or --ip-adapter (SRC: the pipeline the bundle came from, needed for its first ControlNet)")
        from ..export.control_bundle import add_conditioning

        add_conditioning(args.add_to, args.controlnet, src=args.src, check=getattr(args, "check", None) or "quick")
        return 0
    if not args.src or not args.output:
        raise SystemExit("latentrt export: SRC and -o OUT are required (or --add-to BUNDLE --controlnet CN)")

    precision, component_precision = export_precision(
        getattr(args, "profile", None), args.precision, parse_pairs(args.component_precision, "--component-precision"))
    export_bundle(
        args.src, args.output, precision=precision, overwrite=args.overwrite, revision=args.revision,
        component_precision=component_precision,
        check=getattr(args, "check", None) or ("quick" if args.no_check else "full"),
        low_memory=getattr(args, "low_memory", False), trace_size=getattr(args, "trace_size", None),
        profile=getattr(args, "profile", None), max_size=getattr(args, "max_size", None),
        max_batch=getattr(args, "max_batch", None),
        **({"tiny_vae": args.tiny_vae} if getattr(args, "tiny_vae", None) else {}),
        **({"loras": args.lora} if getattr(args, "lora", None) else {}),
        **({"lora_mode": args.lora_mode} if getattr(args, "lora_mode", "fused") != "fused" else {}),
        **({"vae": args.vae} if getattr(args, "vae", None) else {}),
        **({"textual_inversions": args.textual_inversion} if getattr(args, "textual_inversion", None) else {}),
        allow_pickle=getattr(args, "allow_pickle", False),
        **({"config": args.config} if getattr(args, "config", None) else {}),
        **({"controlnets": args.controlnet} if getattr(args, "controlnet", None) else {}),
        **({"adapter": args.adapter} if getattr(args, "adapter", None) else {}),
        **({"ip_adapter": args.ip_adapter} if getattr(args, "ip_adapter", None) else {}),
        **({"image_encoder": args.image_encoder} if getattr(args, "image_encoder", None) else {}),
        safety_checker=getattr(args, "safety_checker", None),
        **({"freeu": True} if getattr(args, "freeu", False) else {}),
    )
    return 0
