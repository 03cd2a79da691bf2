"""A bundle opened by the runtime: manifest checked, files verified, engines created.

Verification hashes every model file once; the hashes are remembered (by size and mtime) in the
bundle's cache folder, so a second load of an unchanged bundle skips the hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..manifest import (REEXPORT_HINT, BundleError, Manifest, bundle_path, check_external_data, read_manifest,
                        verify_files, write_json_atomic)
from .engines import engine_factory

VERIFY_CACHE = "verified.json"


def cache_dir_for(bundle: Path) -> Path:
    """``BUNDLE/.cache`` when writable (and inside the bundle: a ``.cache`` symlink to elsewhere is not
    followed), else a per-bundle folder under ``$LATENTRT_CACHE`` or ~/.cache."""
    env = os.environ.get("LATENTRT_CACHE")
    if not env:
        local = bundle / ".cache"
        try:
            local.mkdir(exist_ok=True)
            if os.access(local, os.W_OK) and local.resolve().is_relative_to(bundle.resolve()):
                return local
        except OSError:
            pass
    root = Path(env) if env else Path.home() / ".cache" / "latentrt"
    key = hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:16]
    path = root / f"{bundle.name}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_options(factory, backend: str, options: dict) -> None:
    """Name the backend's options when a caller passes one it does not take."""
    import inspect

    params = inspect.signature(factory).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    internal = {"name", "path", "inputs", "outputs", "cache_dir", "model_sha", "manifest_entry", "bundle", "device"}
    known = sorted(k for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k not in internal)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"backend {backend!r} does not take option(s) {unknown}; its options are {known}")


class Bundle:
    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        self.cache_dir = cache_dir_for(self.path)
        #: component -> (model file signature, external-data files): checked once per process and file version
        self._external: dict[str, tuple] = {}
        if verify:
            self.verify()

    def verify(self, components: Iterable[str] | None = None) -> None:
        cache_file = self.cache_dir / VERIFY_CACHE
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        updated = verify_files(self.path, self.manifest, components, cache=cache,
                               external_data=lambda _bundle, entry: self.external_data(entry.name))
        if updated != cache:
            try:
                write_json_atomic(cache_file, updated)
            except OSError:
                pass

    @property
    def constants(self) -> dict[str, Any]:
        return self.manifest.constants

    def has(self, component: str) -> bool:
        return component in self.manifest.components

    def component_sha(self, component: str) -> str:
        entry = self.manifest.components[component]
        return entry.files.get(entry.path, "")

    def file(self, rel: str, what: str = "file") -> Path:
        """``rel`` inside the bundle (symlinks followed); :class:`BundleError` if it resolves outside."""
        return bundle_path(self.path, rel, what)

    def engine(self, component: str, backend: str = "onnxruntime", device: str = "cpu", **options):
        if component not in self.manifest.components:
            raise BundleError(f"{self.path}: no component {component!r} in this bundle "
                              f"(it has {', '.join(self.manifest.components)})")
        entry = self.manifest.components[component]
        factory = engine_factory(backend)
        _check_options(factory, backend, options)
        model = self.file(entry.path, f"component {component!r} model file")
        self.external_data(component)  # before any engine opens the model
        return factory(
            component, model, entry.spec.inputs, entry.spec.outputs, device=device,
            cache_dir=self.cache_dir, model_sha=self.component_sha(component), manifest_entry=entry,
            bundle=self, **options,
        )

    def external_data(self, component: str) -> list[str]:
        """The checked external-data files of ``component``'s model (:func:`check_external_data`), parsed once
        per process while its model file is unchanged (size, mtime, inode); :meth:`verify` fills it."""
        entry = self.manifest.components[component]
        try:  # what the memo is keyed by: a cache inside an untrusted bundle must not vouch for it, so none is written
            st = self.file(entry.path, f"component {component!r} model file").stat()
            signature = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            signature = None
        hit = self._external.get(component)
        if hit is not None and signature is not None and hit[0] == signature:
            return list(hit[1])
        files = check_external_data(self.path, entry)
        self._external[component] = (signature, files)
        return list(files)

    def scheduler_config(self, subfolder: str = "scheduler") -> dict:
        """``<subfolder>/scheduler_config.json``: the source's file as published (its own keys only),
        or, in a bundle exported before that (see :attr:`scheduler_configs_as_published`), the config
        re-serialised with every key of its class written out."""
        path = self.file(f"{subfolder}/scheduler_config.json", "scheduler config")
        if not path.is_file():
            raise BundleError(f"{self.path}: {subfolder}/scheduler_config.json is missing; {REEXPORT_HINT}")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: unreadable scheduler config ({e}); {REEXPORT_HINT}") from None

    @property
    def scheduler_configs_as_published(self) -> bool:
        """Whether the scheduler configs are the source's files (exports since published configs
        are kept); older bundles hold every key explicit and cannot tell which keys the source set."""
        return "scheduler_configs" in self.manifest.extra

    def tokenizer(self, subfolder: str = "tokenizer"):
        from .tokenizer import CLIPTokenizer

        return CLIPTokenizer.from_dir(self.file(subfolder, "tokenizer folder"))
