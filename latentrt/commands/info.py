"""latentrt info BUNDLE: what a bundle holds."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show what a bundle holds (components, shapes, precision, parity, engines)")
    p.add_argument("bundle", help="a bundle folder written by `latentrt export`")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    p.set_defaults(func=run)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args) -> int:
    from ..manifest import check_external_data, check_links, read_manifest, verify_files
    from ..sizes import SizeRange

    m = read_manifest(args.bundle)  # refuses paths outside the bundle
    if args.verify:
        verify_files(args.bundle, m)  # sha256 of every file; external data inside the bundle
        check_links(args.bundle)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    src = m.source.get("id") or m.source.get("path") or "?"
    print(f"bundle     {args.bundle}")
    print(f"pipeline   {m.pipeline} ({m.source.get('pipeline_class', '?')}) from {src}")
    print(f"precision  {m.precision}; schema v{m.schema_version}; exported with "
          + ", ".join(f"{k} {v}" for k, v in m.tools.items()))
    keys = ("default_height", "default_width", "vae_scale_factor", "size_multiple", "time_cond_proj_dim",
            "prediction_type")
    print("constants  " + ", ".join(f"{k}={m.constants[k]}" for k in keys if k in m.constants))
    sizes = SizeRange.from_constants(m.constants)
    print(f"sizes      {sizes.describe()}" + (f", at most {sizes.max_batch} images per call" if sizes.max_batch else "")
          + ("" if sizes.recorded else " (exported before size ranges were recorded)"))
    for name, e in m.components.items():
        size = sum(e.sizes.values())
        err = e.parity.get("max_abs")
        parity = f"max abs err vs torch {err:.2e}" if isinstance(err, (int, float)) else "not checked"
        print(f"\n{name}: {e.path} ({_human(size)}, {e.precision}; {parity})")
        for s in e.spec.inputs:
            print(f"    in   {s.name:<24} {s.dtype:<8} {s.shape_str()}")
        for s in e.spec.outputs:
            print(f"    out  {s.name:<24} {s.dtype:<8} {s.shape_str()}")
    for key, value in m.extra.items():
        if key != "export_seconds":
            print(f"\n{key}: {json.dumps(value)[:400]}")
    if args.verify:
        external = sum(len(check_external_data(args.bundle, e)) for e in m.components.values())
        print(f"\nall files match their sha256; every path (model files, {external} external-data file(s), "
              "engines) lies inside the bundle")
    return 0
