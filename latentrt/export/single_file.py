"""Single-file checkpoints (``latentrt export model.safetensors``) through diffusers' ``from_single_file``.

Most community models are published as one original-layout (LDM / A1111) file. The pipeline class comes
from ``--config`` (a local diffusers folder, or a hub id, whose ``model_index.json`` names it, e.g. an
LCM folder gives ``LatentConsistencyModelPipeline``); without it, from the checkpoint's keys (SDXL's
second text encoder, else SD), diffusers then fetching the matching config from the hub. The bundle's
kind (SD 1.x/2.x, SDXL, LCM or not) is then detected from the loaded pipeline as for folders.
``.ckpt`` / ``.pt`` / ``.bin`` files are pickles, which run code when loaded: only with ``allow_pickle``.
"""

from __future__ import annotations

import json
from pathlib import Path

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


class SingleFileError(ValueError):
    pass


def is_single_file(src) -> bool:
    p = Path(str(src))
    return p.is_file() and p.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES


def _pipeline_class(path: Path, config: str | None):
    import diffusers

    name = None
    if config is not None and Path(config).is_dir():
        index = Path(config) / "model_index.json"
        if not index.is_file():
            raise SingleFileError(f"--config {config}: no model_index.json; give a diffusers pipeline folder "
                                  "(written by save_pretrained) or a hub id")
        name = json.loads(index.read_text()).get("_class_name")
    elif path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            name = "StableDiffusionXLPipeline" if SDXL_KEY in set(f.keys()) else "StableDiffusionPipeline"
    cls = getattr(diffusers, name or "StableDiffusionPipeline", None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise SingleFileError(f"{path}: diffusers cannot load a {name} from a single file")
    return cls


def load_single_file(src, *, config: str | None = None, allow_pickle: bool = False):
    """``(pipe, source)`` of a single-file checkpoint, in float32 (see the module docstring)."""
    import torch

    path = Path(str(src))
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise SingleFileError(f"{path}: {suffix} checkpoints are Python pickles, which run code when loaded; pass "
                              "--allow-pickle if you trust the file (or use its .safetensors version)")
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise SingleFileError(f"{path}: not a checkpoint file (.safetensors, or .ckpt with --allow-pickle)")
    cls = _pipeline_class(path, config)
    kwargs = {"torch_dtype": torch.float32}
    if config is not None:
        kwargs.update(config=str(config), local_files_only=Path(config).is_dir())
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as e:
        hint = "" if config else ("; without hub access pass --config DIFFUSERS_FOLDER (a folder of the same "
                                  "architecture, e.g. saved from the base model) so nothing is downloaded")
        raise SingleFileError(f"{path}: diffusers' from_single_file failed: {str(e).splitlines()[0]}{hint}") from e
    source = {"id": None, "path": str(path.resolve()), "revision": None, "pipeline_class": type(pipe).__name__,
              "single_file": True, "config": str(config) if config else None}
    return pipe, source
