"""latentrt export SRC -o OUT: trace a diffusers pipeline to an ONNX bundle."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="export a diffusers pipeline (hub id or local folder) to a bundle")
    p.add_argument("src", help="hub id (owner/name) or a local diffusers folder written by save_pretrained")
    p.add_argument("-o", "--output", required=True, help="bundle folder to create")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--component-precision", action="append", default=[], metavar="NAME=PREC",
                   help="per-component precision, e.g. vae_decoder=fp32 (repeatable)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-check", action="store_true", help="check each component at one size only")
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

    export_bundle(
        args.src, args.output, precision=args.precision, overwrite=args.overwrite, revision=args.revision,
        component_precision=parse_pairs(args.component_precision, "--component-precision"),
        check=not args.no_check,
    )
    return 0
