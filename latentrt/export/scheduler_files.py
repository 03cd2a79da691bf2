"""Every scheduler config of a bundle, as the source published it.

diffusers remembers which keys a loaded ``scheduler_config.json`` did not set (``_use_default_values``)
and, when a user swaps schedulers with ``XScheduler.from_config(pipe.scheduler.config)``, gives those
keys X's defaults, not the source class's. ``save_config`` would write every key of the source class
out and lose that, so the bundle gets the source folder's file byte for byte instead (or, for a
pipeline that exists only in memory, its config without the keys diffusers took from defaults: what
``from_config`` would see). The runtime then applies diffusers' rule to the file's own keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..manifest import write_bytes_atomic

CONFIG_NAME = "scheduler_config.json"
#: how a bundle's scheduler config was obtained (``manifest.extra["scheduler_configs"][subfolder]``)
FROM_FILE, FROM_MEMORY = "source file", "in-memory config"


def pipeline_schedulers(pipe) -> dict[str, Any]:
    """The pipeline's schedulers by attribute name (``scheduler``, unCLIP's ``prior_scheduler`` and
    ``image_noising_scheduler``, ...)."""
    from diffusers import SchedulerMixin

    return {name: obj for name, obj in pipe.components.items() if isinstance(obj, SchedulerMixin)}


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def file_matches(published: dict, scheduler) -> bool:
    """Whether ``scheduler`` is what diffusers builds from ``published`` (same class, same values for
    every key the file sets), i.e. nobody replaced or reconfigured it after loading."""
    if published.get("_class_name") != type(scheduler).__name__:
        return False
    cfg = scheduler.config
    return all(_plain(cfg[k]) == _plain(v) for k, v in published.items() if not k.startswith("_") and k in cfg)


def in_memory_config(scheduler) -> dict:
    """The keys of ``scheduler.config`` that did not come from the class's defaults, as
    ``from_config`` keeps them (a scheduler built in code: the keyword arguments it was given)."""
    cfg = dict(scheduler.config)
    defaults = set(cfg.pop("_use_default_values", ()))
    out = {k: _plain(v) for k, v in cfg.items() if k not in defaults and k != "_ignore_files"}
    out["_class_name"] = type(scheduler).__name__
    return dict(sorted(out.items()))


def source_file(src, subfolder: str, revision: str | None = None) -> Path | None:
    """``SRC/<subfolder>/scheduler_config.json`` of a local folder or of a hub id's cached snapshot."""
    if src is None:
        return None
    rel = f"{subfolder}/{CONFIG_NAME}"
    if Path(src).is_dir():
        p = Path(src) / rel
        return p if p.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on it
        return None
    try:
        hit = try_to_load_from_cache(str(src), rel, revision=revision)
    except Exception:  # not a valid repo id
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def write_scheduler_configs(pipe, root: Path, src=None, revision: str | None = None) -> dict[str, str]:
    """Write ``root/<name>/scheduler_config.json`` for each of the pipeline's schedulers: the source
    folder's file when it still describes the loaded scheduler, else :func:`in_memory_config`.
    Returns ``{name: FROM_FILE | FROM_MEMORY}`` for the manifest."""
    how = {}
    for name, scheduler in pipeline_schedulers(pipe).items():
        path = source_file(src, name, revision)
        data = path.read_bytes() if path is not None else None
        if data is not None and file_matches(json.loads(data), scheduler):
            how[name] = FROM_FILE
        else:
            data = (json.dumps(in_memory_config(scheduler), indent=2) + "\n").encode()
            how[name] = FROM_MEMORY
        write_bytes_atomic(Path(root) / name / CONFIG_NAME, data)
    return how
