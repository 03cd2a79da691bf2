"""latentrt check BUNDLE --backends onnxruntime,torch: compare backends component by component."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check", help="run every component on several backends on the same inputs and compare")
    p.add_argument("bundle", help="a bundle folder written by `latentrt export`")
    p.add_argument("--backends", default="onnxruntime,torch",
                   help="comma-separated BACKEND[:DEVICE], the first is the reference "
                        "(default onnxruntime,torch; e.g. onnxruntime:cpu,torch:cuda,tensorrt:cuda)")
    p.add_argument("--components", help="comma-separated components (default: all)")
    p.add_argument("--height", type=int, help="image height of the inputs (default: the bundle's)")
    p.add_argument("--width", type=int, help="image width of the inputs (default: the bundle's)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the inputs (default 1)")
    p.add_argument("--tolerance", type=float,
                   help="max relative error allowed (default 1e-3 for fp32 components, 5e-2 for fp16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..check import check_bundle, format_report, parse_backends

    backends = parse_backends(args.backends)
    sizes = {"B": args.batch}
    if args.height:
        sizes["H"] = args.height
    if args.width:
        sizes["W"] = args.width
    comps = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    results = check_bundle(args.bundle, backends, components=comps, sizes=sizes, tolerance=args.tolerance,
                           seed=args.seed)
    print(format_report(results, f"{backends[0][0]}:{backends[0][1]}"))
    bad = [r for r in results if not r.ok]
    if bad:
        print(f"\n{len(bad)} of {len(results)} outputs are above tolerance", flush=True)
        return 1
    print(f"\nall {len(results)} outputs within tolerance")
    return 0
