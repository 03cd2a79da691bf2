"""latentrt build BUNDLE --profile NAME: TensorRT engines for the shapes of a profile."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("build", help="build TensorRT engines for a bundle from a shape/precision profile")
    p.add_argument("bundle", help="a bundle folder written by `latentrt export`")
    p.add_argument("--profile", required=True, help="a packaged profile name (`latentrt profiles`) or a .toml path")
    p.add_argument("--components", help="comma-separated components to build (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    p.add_argument("--cleanup", choices=["auto", "graphsurgeon", "onnxruntime"], default="auto",
                   help="how to constant-fold the ONNX graph first (default: onnx-graphsurgeon if installed)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export.tensorrt_build import BuildError, build_engines
    from ..profiles import load_profile

    profile = load_profile(args.profile)
    comps = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    try:
        build_engines(args.bundle, profile, components=comps, force=args.force, cleanup=args.cleanup)
    except BuildError as e:
        raise ValueError(str(e)) from None  # printed as one line by the CLI
    return 0
