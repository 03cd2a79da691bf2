"""The bundle manifest (``latentrt.json``): read, write, validate.

Shared by export (which writes it) and the runtime (which refuses a bundle whose schema, files or
hashes do not match). Pure stdlib: no numpy, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .components import ComponentSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "latentrt.json"
FORMAT = "latentrt-bundle"
REEXPORT_HINT = "re-export it with `latentrt export SRC -o BUNDLE`"


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupted or of an unknown schema."""


@dataclass
class ComponentEntry:
    """One exported model file of a bundle and what it computes."""

    name: str
    path: str  # relative to the bundle, the .onnx file
    spec: ComponentSpec
    precision: str = "fp32"
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (the .onnx and its external data)
    sizes: dict[str, int] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"path": self.path, "precision": self.precision, **self.spec.to_dict(), "files": self.files,
             "sizes": self.sizes, "parity": self.parity}
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ComponentEntry":
        return cls(name, d["path"], ComponentSpec.from_dict(name, d), d.get("precision", "fp32"),
                   dict(d.get("files", {})), dict(d.get("sizes", {})), dict(d.get("parity", {})),
                   dict(d.get("extra", {})))


@dataclass
class Manifest:
    pipeline: str  # "lcm", "sd", ... : picks the runtime pipeline class
    components: dict[str, ComponentEntry]
    constants: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    tools: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # engines, loras, tiny vae... owned by their features
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "pipeline": self.pipeline,
            "precision": self.precision,
            "source": self.source,
            "constants": self.constants,
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "tools": self.tools,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(
            pipeline=d["pipeline"],
            components={k: ComponentEntry.from_dict(k, v) for k, v in d["components"].items()},
            constants=dict(d.get("constants", {})),
            source=dict(d.get("source", {})),
            precision=d.get("precision", "fp32"),
            tools=dict(d.get("tools", {})),
            extra=dict(d.get("extra", {})),
            schema_version=d["schema_version"],
        )

    def write(self, bundle: str | os.PathLike) -> None:
        write_json_atomic(Path(bundle) / MANIFEST_NAME, self.to_dict())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write next to ``path`` and rename into place, so readers never see half a file. The file gets
    the usual umask-based mode (mkstemp alone would leave it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle: str | os.PathLike) -> Manifest:
    """Parse and check the schema of a bundle's manifest (files are checked by :func:`verify_files`)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory; create one with `latentrt export SRC -o {bundle}`")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle}: not a latentrt bundle ({MANIFEST_NAME} is missing); {REEXPORT_HINT}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e}); {REEXPORT_HINT}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not a latentrt manifest (no format {FORMAT!r}); {REEXPORT_HINT}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: bundle schema version {version!r} is not supported by this latentrt "
            f"(it reads version {SCHEMA_VERSION}); {REEXPORT_HINT} with this version of latentrt"
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: {e}); {REEXPORT_HINT}") from None
    check_manifest_paths(bundle, manifest)
    return manifest


# -- confinement: a bundle only ever makes latentrt read files inside it -----------------------------
#: component names become file names (caches): one path segment, no hidden or relative names
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _is_absolute(rel: str) -> bool:
    return PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or bool(PureWindowsPath(rel).drive)


def bundle_path(bundle: str | os.PathLike, rel: Any, what: str = "path", *, within: str = "") -> Path:
    """``bundle / rel`` with symlinks followed; a :class:`BundleError` unless it lies inside the
    bundle (inside ``bundle / within`` when given). ``rel`` comes from a manifest (or is one of the
    bundle's fixed folders, which may be symlinks): an absolute path, a ``..`` that climbs out or a
    symlink to elsewhere is refused before anything reads it."""
    bundle = Path(bundle)
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{bundle}: {what} {rel!r} is not a path relative to the bundle; {REEXPORT_HINT}")
    if _is_absolute(rel):
        raise BundleError(f"{bundle}: {what} {rel!r} is an absolute path, outside the bundle; a bundle refers "
                          f"only to its own files, by relative paths. Refusing to read it; {REEXPORT_HINT}")
    root = (bundle / within).resolve() if within else bundle.resolve()
    path = (bundle / rel).resolve()
    if not path.is_relative_to(root):
        where = f"the bundle's {within}/ folder" if within else "the bundle"
        raise BundleError(f"{bundle}: {what} {rel!r} is outside {where} (it resolves to {path}); refusing to "
                          f"read it. A bundle refers only to its own files; {REEXPORT_HINT}")
    return path


def check_links(bundle: str | os.PathLike) -> None:
    """No symlink anywhere in the bundle (its own ``.cache`` aside) points outside it (``info --verify``:
    loading checks each file it reads, this checks the files it might read)."""
    bundle = Path(bundle)
    for dirpath, dirnames, filenames in os.walk(bundle):
        here = Path(dirpath)
        if here == bundle and ".cache" in dirnames:
            dirnames.remove(".cache")
        for name in [*dirnames, *filenames]:
            if (here / name).is_symlink():
                bundle_path(bundle, (here / name).relative_to(bundle).as_posix(), "symlink")


def check_manifest_paths(bundle: str | os.PathLike, manifest: Manifest) -> None:
    """Every path the manifest names (component files, TensorRT plans) lies inside the bundle."""
    for name, entry in manifest.components.items():
        if not _COMPONENT_NAME.fullmatch(name):
            raise BundleError(f"{bundle}: component name {name!r} is not a plain name (letters, digits, '_', '.', "
                              f"'-'); {REEXPORT_HINT}")
        bundle_path(bundle, entry.path, f"component {name!r} model file")
        for rel in {*entry.files, *entry.sizes}:
            bundle_path(bundle, rel, f"component {name!r} file")
    from .engine_cache import ENGINES_DIR  # engine_cache imports this module

    for key, rec in (manifest.extra.get("engines") or {}).items():
        if isinstance(rec, dict) and "path" in rec:
            bundle_path(bundle, rec["path"], f"TensorRT plan of engine {key!r}", within=ENGINES_DIR)


def external_data_files(root: str | os.PathLike, model: str | os.PathLike, what: str = "") -> list[tuple[str, Path]]:
    """(location, resolved path) of each external-data file of the ONNX model at ``model``, read from
    the graph without loading a weight (:mod:`latentrt.onnx_refs`); a :class:`BundleError` when one
    lies outside ``root`` (the bundle, or a cache folder for the models latentrt caches)."""
    from .onnx_refs import OnnxFormatError, external_data_locations

    model, root = Path(model).resolve(), Path(root)
    what = what or model.name
    try:
        locations = external_data_locations(model)
    except OnnxFormatError:
        # not a well-formed protobuf (the reader skips what protobuf parsers skip, groups included), so
        # no ONNX reader follows a reference in it: the engine refuses the file with its own clear error
        return []
    except OSError as e:
        raise BundleError(f"{root}: {what} could not be read ({e}); {REEXPORT_HINT}") from None
    # ONNX resolves a location next to the (real) model file
    folder = model.parent.relative_to(root.resolve()).as_posix() if model.is_relative_to(root.resolve()) else None
    if folder is None:
        raise BundleError(f"{root}: {what} is outside {root} (it resolves to {model}); refusing to read it")
    out = []
    for loc in locations:
        label = f"external data {loc!r} of {what}"
        if _is_absolute(loc):
            bundle_path(root, loc, label)  # raises: absolute
        out.append((loc, bundle_path(root, loc if folder == "." else f"{folder}/{loc}", label)))
    return out


def check_external_data(bundle: str | os.PathLike, entry: ComponentEntry) -> list[str]:
    """The external-data files of component ``entry``'s ONNX model, bundle-relative, after checking
    that each lies inside the bundle and is one of the component's recorded (hashed) files. Called
    before any engine opens the model."""
    model = bundle_path(bundle, entry.path, f"component {entry.name!r} model file")
    if not model.is_file():  # whatever its name: an engine would read it as ONNX
        return []
    root = Path(bundle).resolve()
    out = []
    for loc, path in external_data_files(bundle, model, entry.path):
        rel = path.relative_to(root).as_posix()
        if entry.files and rel not in entry.files:
            raise BundleError(f"{bundle}: {entry.path} keeps weights in {loc!r}, which is not one of component "
                              f"{entry.name!r}'s recorded files (its sha256 is unknown); {REEXPORT_HINT}")
        out.append(rel)
    return out


def verify_files(bundle: str | os.PathLike, manifest: Manifest, components=None, *, cache: dict | None = None,
                 external_data=None) -> dict:
    """Check that every file of the named components exists with its recorded size and sha256.

    ``cache`` maps relative path -> [size, mtime_ns, sha256] of files already hashed; a file whose
    size and mtime are unchanged is not hashed again (that is what makes a second load fast). The
    updated cache is returned. ``external_data(bundle, entry)`` checks each component's external-data
    references (default :func:`check_external_data`; a :class:`~latentrt.runtime.bundle.Bundle` passes its
    in-process memo of it).
    """
    bundle = Path(bundle)
    cache = dict(cache or {})
    names = components if components is not None else list(manifest.components)
    for name in names:
        if name not in manifest.components:
            raise BundleError(f"{bundle}: the manifest has no component {name!r}; {REEXPORT_HINT}")
        entry = manifest.components[name]
        for rel, digest in entry.files.items():
            p = bundle_path(bundle, rel, f"component {name!r} file")
            if not p.is_file():
                raise BundleError(f"{bundle}: component {name!r} is incomplete: {rel} is missing; {REEXPORT_HINT}")
            st = p.stat()
            expected_size = entry.sizes.get(rel)
            if expected_size is not None and st.st_size != expected_size:
                raise BundleError(
                    f"{bundle}: {rel} is corrupted (size {st.st_size}, manifest says {expected_size}); {REEXPORT_HINT}"
                )
            hit = cache.get(rel)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns and hit[2] == digest:
                continue
            actual = sha256_file(p)
            if actual != digest:
                raise BundleError(f"{bundle}: {rel} is corrupted (sha256 does not match the manifest); {REEXPORT_HINT}")
            cache[rel] = [st.st_size, st.st_mtime_ns, digest]
        (external_data or check_external_data)(bundle, entry)  # after the hashes: a corrupted file is reported as such
    return cache
