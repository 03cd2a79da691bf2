"""latentrt profiles [NAME|PATH]: list the packaged shape/precision profiles, or show one."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("profiles", help="list the shape/precision profiles (or show one) used by export and build")
    p.add_argument("profile", nargs="?", help="a profile name or the path of your own .toml file to show")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--bundle", help="also show the min/opt/max input shapes the profile gives this bundle's components")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..profiles import available_profiles, load_profile

    if args.profile:
        prof = load_profile(args.profile)
        if args.json:
            print(json.dumps(prof.to_dict(), indent=2))
            return 0
        print(f"{prof.name}: {prof.description}")
        print(f"  file       {prof.path}")
        print(f"  pipeline   {prof.pipeline or 'any'}")
        for sym, r in prof.dims.items():
            print(f"  dim {sym:<6} min {r.min:<5} opt {r.opt:<5} max {r.max}")
        print("  precision  " + ", ".join([f"default={prof.default_precision}",
                                            *(f"{k}={v}" for k, v in prof.precision.items())]))
        if prof.batch_multiplier:
            print("  batch x    " + ", ".join(f"{k}={v}" for k, v in prof.batch_multiplier.items()))
        b = prof.builder
        print(f"  builder    workspace {b.workspace_gib} GiB, optimization level {b.optimization_level}, "
              f"timing cache {'on' if b.timing_cache else 'off'}")
        if args.bundle:
            _print_shapes(prof, args.bundle)
        return 0
    profiles = {name: load_profile(path) for name, path in available_profiles().items()}
    if args.json:
        print(json.dumps({n: p.to_dict() for n, p in profiles.items()}, indent=2))
        return 0
    width = max(len(n) for n in profiles)
    for name, prof in profiles.items():
        print(f"{name:<{width}}  {prof.pipeline or 'any':<15} {prof.summary()}")
    print("\nuse one with `latentrt export SRC -o BUNDLE --profile NAME` and `latentrt build BUNDLE --profile NAME`;"
          " pass --profile path/to/your.toml for your own")
    return 0


def _print_shapes(prof, bundle) -> None:
    from ..manifest import read_manifest

    m = read_manifest(bundle)
    if prof.pipeline and prof.pipeline != m.pipeline:
        print(f"\nwarning: the profile is meant for {prof.pipeline!r} bundles; {bundle} is {m.pipeline!r}")
    for name, entry in m.components.items():
        print(f"\n{name} ({entry.precision}; the profile says {prof.precision_for(name)}):")
        for inp, s in prof.shapes_for(entry.spec).items():
            print(f"    {inp:<24} min {list(s.min)}  opt {list(s.opt)}  max {list(s.max)}")
