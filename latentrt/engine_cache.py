"""The TensorRT engine cache of a bundle: keys, records in the manifest, staleness.

Engines live under ``BUNDLE/engines/<key>/<component>.plan``. The key hashes everything an engine
depends on: the ONNX file's sha256, the profile *as it applies to that component* (its min/opt/max
input shapes, precision and the builder options that change the engine), the TensorRT version and
the GPU's compute capability. Two profiles that give a component the same shapes share its engine.

``manifest.extra["engines"]`` maps key -> record (component, profile, path, hashes, versions,
limits). A bundle can hold engines for several GPUs and TensorRT versions at once (it may be shared
by machines); the runtime picks the record that matches this machine and refuses the others with a
message that says why and how to rebuild. An engine is never loaded when:

- its ONNX sha differs from the component's current file (the component was re-exported: stale),
- it was built with another TensorRT version (plans are not portable across versions),
- it was built for another compute capability (another GPU generation),
- its plan file is missing or does not match its recorded sha256.

Pure stdlib, shared by ``latentrt build`` (export side) and the TensorRT backend (runtime side).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from .manifest import BundleError, Manifest, bundle_path, sha256_file

ENGINES_DIR = "engines"
KEY_LENGTH = 20


class EngineCacheError(BundleError):
    """No usable engine for a component (none built, or only stale/foreign ones)."""


def component_profile_view(profile, spec, precision: str) -> dict:
    """What of ``profile`` an engine of component ``spec`` depends on (canonical, JSON-able)."""
    shapes = profile.shapes_for(spec)
    return {
        "component": spec.name,
        "shapes": {name: s.as_dict() for name, s in shapes.items()},
        "precision": precision,
        "workspace_gib": profile.builder.workspace_gib,
        "optimization_level": profile.builder.optimization_level,
    }


def engine_key(onnx_sha: str, profile_view: Mapping[str, Any], trt_version: str, compute_capability: str) -> str:
    """hash(ONNX sha, profile (as it applies to the component), TensorRT version, GPU compute capability)."""
    if not onnx_sha:
        raise ValueError("engine_key needs the component's ONNX sha256 (the manifest records it)")
    payload = json.dumps({"onnx_sha256": onnx_sha, "profile": profile_view, "tensorrt": str(trt_version),
                          "compute_capability": str(compute_capability)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def onnx_sha(manifest: Manifest, component: str) -> str:
    entry = manifest.components[component]
    return entry.files.get(entry.path, "")


def engine_records(manifest: Manifest) -> dict[str, dict]:
    return dict(manifest.extra.get("engines", {}))


def engine_problems(record: Mapping[str, Any], *, onnx_sha: str, trt_version: str | None,
                    compute_capability: str | None, bundle: str | Path | None = None,
                    check_file: bool = True) -> list[str]:
    """Why ``record`` cannot be loaded here (empty list: it can). ``None`` versions are not checked."""
    problems = []
    if record.get("onnx_sha256") != onnx_sha:
        problems.append("it was built from another ONNX file (the component was re-exported since): stale")
    if trt_version is not None and str(record.get("tensorrt")) != str(trt_version):
        problems.append(f"it was built with TensorRT {record.get('tensorrt')}; this machine has TensorRT {trt_version}")
    if compute_capability is not None and str(record.get("compute_capability")) != str(compute_capability):
        problems.append(f"it was built for a GPU of compute capability {record.get('compute_capability')}; "
                        f"this GPU is {compute_capability}")
    if check_file and bundle is not None:
        try:
            path = bundle_path(bundle, record.get("path"), "plan file", within=ENGINES_DIR)
        except BundleError as e:
            return [*problems, f"its plan file {record.get('path')!r} is refused: {e}"]
        if not path.is_file():
            problems.append(f"its plan file {record.get('path')} is missing")
        elif not _plan_unchanged(path, record):
            problems.append(f"its plan file {record.get('path')} does not match its recorded sha256 (corrupted)")
    return problems


def _plan_unchanged(path: Path, record: Mapping[str, Any]) -> bool:
    """The plan is the one recorded: same size and mtime as at build time (no hashing, so a service
    starts in seconds), else its sha256 must match (a copied bundle pays one hash per plan)."""
    st = path.stat()
    if "plan_size" in record and st.st_size != record["plan_size"]:
        return False
    if record.get("plan_mtime_ns") == st.st_mtime_ns and record.get("plan_size") == st.st_size:
        return True
    return not record.get("plan_sha256") or sha256_file(path) == record["plan_sha256"]


def rebuild_hint(bundle, profile_name: str | None) -> str:
    return f"build one with `latentrt build {bundle} --profile {profile_name or 'NAME'}`"


def select_engine(manifest: Manifest, component: str, *, bundle: str | Path, trt_version: str | None,
                  compute_capability: str | None, profile: str | None = None, check_file: bool = True) -> tuple[str, dict]:
    """The (key, record) of the engine of ``component`` usable on this machine, else EngineCacheError
    that lists every candidate and why it was refused."""
    sha = onnx_sha(manifest, component)
    candidates = [(k, r) for k, r in engine_records(manifest).items() if r.get("component") == component
                  and (profile is None or r.get("profile") == profile)]
    if not candidates:
        which = f" for profile {profile!r}" if profile else ""
        raise EngineCacheError(f"{bundle}: no TensorRT engine of {component!r}{which} in this bundle; "
                               + rebuild_hint(bundle, profile))
    refused = []
    for key, rec in candidates:
        problems = engine_problems(rec, onnx_sha=sha, trt_version=trt_version, compute_capability=compute_capability,
                                   bundle=bundle, check_file=check_file)
        if not problems:
            return key, rec
        refused.append(f"engines/{key} (profile {rec.get('profile')}): " + "; ".join(problems))
    raise EngineCacheError(
        f"{bundle}: refusing to load the TensorRT engine(s) of {component!r}, none fits this machine:\n  "
        + "\n  ".join(refused) + "\n" + rebuild_hint(bundle, profile or candidates[0][1].get("profile"))
    )
