"""Tiny random pipelines that carry a published checkpoint's own files.

``latentrt/export/published/<org>--<repo>/`` holds, as data, the small files a published checkpoint
ships (``model_index.json``, every ``scheduler_config.json``, the tokenizer configs) and a
``SOURCE.json`` that names the repo, says how each file was obtained and lists the pipeline
constants that matter (VAE scaling factor, sample size, ``time_cond_proj_dim``, ...).
:func:`save_tiny_published` builds the tiny model of the repo's kind (:mod:`latentrt.export.tiny`,
:mod:`latentrt.export.tiny_unclip`), gives it those constants, saves it with ``save_pretrained`` and
writes the published files over what ``save_pretrained`` wrote: only architecture dims are shrunk.
A repo that publishes only a UNet (``latent-consistency/lcm-sdxl``) names its ``base`` repo, whose
files it is used with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .tiny import save_tiny_lcm, save_tiny_sd, save_tiny_sdxl, save_tiny_upscaler
from .tiny_unclip import save_tiny_unclip
from .vocab import write_clip_tokenizer

PUBLISHED = Path(__file__).parent / "published"
SOURCE = "SOURCE.json"

#: repo -> (saver of the tiny folder, its keyword arguments)
BUILDERS = {
    "runwayml/stable-diffusion-v1-5": (save_tiny_sd, {}),
    "stabilityai/stable-diffusion-2-1": (save_tiny_sd, {"v_prediction": True}),
    "SimianLuo/LCM_Dreamshaper_v7": (save_tiny_lcm, {}),
    "stabilityai/stable-diffusion-xl-base-1.0": (save_tiny_sdxl, {}),
    "segmind/SSD-1B": (save_tiny_sdxl, {"ssd": True}),
    "latent-consistency/lcm-sdxl": (save_tiny_sdxl, {"lcm": True}),
    "latent-consistency/lcm-ssd-1b": (save_tiny_sdxl, {"lcm": True, "ssd": True}),
    "stabilityai/sd-x2-latent-upscaler": (save_tiny_upscaler, {}),
    "stabilityai/stable-diffusion-2-1-unclip": (save_tiny_unclip, {"img2img": True}),
    "stabilityai/stable-diffusion-2-1-unclip-small": (save_tiny_unclip, {"img2img": True}),
}
REPOS = tuple(BUILDERS)


def published_dir(repo: str) -> Path:
    d = PUBLISHED / repo.replace("/", "--")
    if not (d / SOURCE).is_file():
        known = sorted(p.name.replace("--", "/", 1) for p in PUBLISHED.iterdir() if (p / SOURCE).is_file())
        raise KeyError(f"no published files for {repo!r}; stored: {', '.join(known)}")
    return d


def source_info(repo: str) -> dict:
    """The repo's ``SOURCE.json``: provenance of each file and the pipeline constants."""
    return json.loads((published_dir(repo) / SOURCE).read_text())


def published_constants(repo: str) -> dict:
    """The repo's pipeline constants (a UNet-only repo: its base repo's, then its own)."""
    info = source_info(repo)
    base = source_info(info["base"]).get("constants", {}) if info.get("base") else {}
    return {**base, **info.get("constants", {})}


def published_files(repo: str) -> dict[str, Path]:
    """Relative path -> stored file, for the repo (or, for a UNet-only repo, its base repo)."""
    base = source_info(repo).get("base")
    d = published_dir(base or repo)
    return {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*.json")) if p.name != SOURCE}


#: the constants a tiny model takes over exactly (the rest of SOURCE.json's constants are architecture
#: dims, which stay shrunk, or notes)
APPLIED = {"vae": ("scaling_factor", "force_upcast"), "unet": ("sample_size", "time_cond_proj_dim")}


def _module_constants(constants: dict) -> dict[str, dict]:
    """``{"unet.sample_size": 96, ...}`` -> ``{"unet": {"sample_size": 96}}`` for the :data:`APPLIED` keys."""
    out: dict[str, dict] = {}
    for key, value in constants.items():
        module, _, attr = key.partition(".")
        if attr in APPLIED.get(module, ()):
            out.setdefault(module, {})[attr] = value
    return out


#: config keys no weight's shape depends on: changed in config.json alone
SHAPELESS = ("scaling_factor", "force_upcast", "sample_size")


def _reconfigure(folder: Path, module: str, changes: dict) -> None:
    """Rewrite ``folder/module`` with its config changed. Keys in :data:`SHAPELESS` only edit its
    config.json; another change (``time_cond_proj_dim``) rebuilds the module, keeping every weight
    whose shape stays (a new guidance projection is seeded)."""
    path = folder / module / "config.json"
    config = json.loads(path.read_text())
    changes = {k: v for k, v in changes.items() if config.get(k) != v}
    if all(k in SHAPELESS for k in changes):
        path.write_text(json.dumps({**config, **changes}, indent=2, sort_keys=True) + "\n")
        return
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[module]
    old = cls.from_pretrained(str(folder / module))
    torch.manual_seed(0)
    new = cls.from_config({**old.config, **changes}).eval()
    kept = old.state_dict()
    new.load_state_dict({k: kept[k] if k in kept and kept[k].shape == v.shape else v
                         for k, v in new.state_dict().items()})
    shutil.rmtree(folder / module)
    new.save_pretrained(str(folder / module), safe_serialization=True)


def _write_tokenizer(folder: Path, files: dict[str, Path]) -> None:
    """A tokenizer folder as published SD checkpoints have it: CLIP's vocab.json and merges.txt (no
    tokenizer.json) and the published tokenizer_config.json / special_tokens_map.json."""
    pad = json.loads(files["special_tokens_map.json"].read_text())["pad_token"]
    pad = pad["content"] if isinstance(pad, dict) else pad
    shutil.rmtree(folder, ignore_errors=True)
    write_clip_tokenizer(folder, pad_token=pad)
    for name, path in files.items():
        shutil.copyfile(path, folder / name)


def save_tiny_published(out_dir: str | Path, repo: str, seed: int = 0) -> Path:
    """A tiny random pipeline saved as a diffusers folder that carries ``repo``'s published
    ``model_index.json``, scheduler configs and tokenizer configs byte for byte."""
    if repo not in BUILDERS:
        raise KeyError(f"no tiny builder for {repo!r}; known: {', '.join(REPOS)}")
    save, kwargs = BUILDERS[repo]
    out = Path(out_dir)
    save(out, seed, **kwargs)
    for module, changes in _module_constants(published_constants(repo)).items():
        _reconfigure(out, module, changes)
    files = published_files(repo)
    tokenizers: dict[str, dict[str, Path]] = {}
    for rel, path in files.items():
        sub, _, name = rel.rpartition("/")
        if sub.startswith("tokenizer"):
            tokenizers.setdefault(sub, {})[name] = path
        else:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / rel)
    for sub, tok_files in tokenizers.items():
        _write_tokenizer(out / sub, tok_files)
    index = json.loads(files["model_index.json"].read_text())
    if index.get("feature_extractor", [None])[0] and not (out / "feature_extractor").is_dir():
        _write_feature_extractor(out / "feature_extractor")
    return out


def _write_feature_extractor(folder: Path) -> None:
    """The index names a CLIP image processor (for the safety checker, which tests load as None):
    give the folder a default one so the index loads."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor().save_pretrained(str(folder))
