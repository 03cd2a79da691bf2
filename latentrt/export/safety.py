"""``latentrt export SRC -o OUT --safety-checker``: diffusers' ``StableDiffusionSafetyChecker``.

The checker's CLIP vision model + visual projection become the ``safety_checker`` component
(``pixel_values -> image_embeds``); its concept embeddings, special-care embeddings and their
thresholds go beside it as data (``safety_checker/concepts.npz``, sha256 in the manifest), and the
feature extractor (``CLIPImageProcessor``) settings as ``feature_extractor/preprocessor_config.json``.
The runtime side is :mod:`latentrt.runtime.safety`.

Default (``safety_checker=None``, no flag): exported when the source carries one, as diffusers
loads it by default: a pipeline object with a ``safety_checker``, or a source whose
``model_index.json`` names one and whose ``safety_checker/`` weights are there (a local folder that
names one without its weights is exported without it, with a note). ``True`` (``--safety-checker``)
requires one; ``False`` (``--no-safety-checker``) leaves it out. Only the SD 1.x/2.x and LCM pipeline
kinds take one: diffusers' SDXL pipelines have no safety checker.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import components as C
from ..manifest import sha256_file, write_bytes_atomic, write_json_atomic
from ..runtime.clip_image import CLIPImageConfig
from ..runtime.safety import COMPONENT, CONCEPTS_FILE, FEATURE_EXTRACTOR
from .recipes import ComponentPlan, UnsupportedModelError

#: pipeline kinds whose diffusers pipelines run a safety checker
KINDS = ("lcm", "sd")


class SafetyCheckerWrapper(torch.nn.Module):
    """``pixel_values -> visual_projection(vision_model(pixel_values).pooler_output)``: the checker's
    image embeddings (its ``forward`` without the concept comparison)."""

    def __init__(self, checker):
        super().__init__()
        self.vision_model, self.visual_projection = checker.vision_model, checker.visual_projection

    def forward(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values)[1])


@dataclass
class SafetyExport:
    checker: Any  # StableDiffusionSafetyChecker
    feature_extractor: Any  # CLIPImageProcessor
    plan: ComponentPlan

    def write(self, root: Path) -> dict:
        """Concept data + feature extractor into the bundle, the model index updated; the manifest's
        ``extra["safety_checker"]``."""
        root = Path(root)
        arrays = {name: getattr(self.checker, name).detach().float().cpu().numpy().astype(np.float32)
                  for name in ("concept_embeds", "concept_embeds_weights", "special_care_embeds",
                               "special_care_embeds_weights")}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = root / CONCEPTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buf.getvalue())
        self.feature_extractor.save_pretrained(str(root / FEATURE_EXTRACTOR))
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                     feature_extractor=["transformers", type(self.feature_extractor).__name__],
                     requires_safety_checker=True)
        write_json_atomic(index_path, index)
        return {"concepts": {"path": CONCEPTS_FILE, "sha256": sha256_file(path),
                             "rows": {k: int(v.shape[0]) for k, v in arrays.items() if k.endswith("embeds")}},
                "feature_extractor": FEATURE_EXTRACTOR, "special_care_adjustment": 0.01}


def _index(src, revision) -> dict:
    """The source's model_index.json ({} when it cannot be read)."""
    if src is None:
        return {}
    local = Path(str(src))
    if local.is_dir():
        try:
            return json.loads((local / "model_index.json").read_text())
        except (OSError, ValueError):
            return {}
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(str(src), revision=revision))
    except Exception:
        return {}


def _names_checker(index: dict) -> bool:
    entry = index.get("safety_checker")
    return isinstance(entry, (list, tuple)) and bool(entry) and entry[0] is not None


def _load_from_source(src, revision):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    kw = {"revision": revision} if revision else {}
    return StableDiffusionSafetyChecker.from_pretrained(str(src), subfolder="safety_checker", dtype=torch.float32,
                                                         **kw).eval()


def _feature_extractor(pipe, src, revision):
    fe = getattr(pipe, "feature_extractor", None)
    if fe is not None or src is None:
        return fe
    from transformers import CLIPImageProcessor

    try:
        return CLIPImageProcessor.from_pretrained(str(src), subfolder="feature_extractor",
                                                  **({"revision": revision} if revision else {}))
    except (OSError, ValueError):
        return None


def prepare_safety_checker(pipe, src, kind: str, want: bool | None, *, revision: str | None = None,
                           progress: Callable[[str], None] = print) -> SafetyExport | None:
    """What to export for the safety checker (None: nothing; see the module docstring)."""
    if want is not None and not isinstance(want, bool):
        raise ValueError(f"safety_checker must be True, False or None (export one when the source has it); "
                         f"got {want!r}")
    if want is False:
        return None
    if kind not in KINDS:
        if want:
            why = ("diffusers' SDXL pipelines have no safety checker" if kind == "sdxl"
                   else f"diffusers' pipeline for this kind ({kind}) runs no safety checker")
            raise UnsupportedModelError(f"--safety-checker: {why}, so there is nothing to export or to match; export "
                                        f"without --safety-checker (it is exported for {', '.join(KINDS)} pipelines)")
        return None
    checker = getattr(pipe, "safety_checker", None)
    where = "the pipeline"
    if checker is None:
        from .single_file import is_single_file

        single = src is not None and is_single_file(src)
        index = {} if single else _index(src, revision)
        local = src is not None and Path(str(src)).is_dir()
        weights = (not local) or (Path(str(src)) / "safety_checker" / "config.json").is_file()
        if _names_checker(index) and weights:
            progress("loading the safety checker" + ("" if want else " (the source carries one; "
                                                             "--no-safety-checker leaves it out)"))
            checker, where = _load_from_source(src, revision), f"{src}/safety_checker"
        elif want:
            what = ("a single-file checkpoint holds no safety checker" if single
                    else f"{src} carries none (its model_index.json names no safety_checker, or its "
                         "safety_checker/ folder is missing)")
            raise UnsupportedModelError(f"--safety-checker: {what}; export from a diffusers folder or hub id that "
                                        "has one (SD 1.x checkpoints do), or without --safety-checker")
        else:
            if _names_checker(index):
                progress(f"note: {src}/model_index.json names a safety checker but its safety_checker/ folder is "
                         "missing: exporting without one")
            return None
    fe = _feature_extractor(pipe, src, revision)
    if fe is None:
        raise UnsupportedModelError(f"--safety-checker: the safety checker in {where} needs the pipeline's "
                                    "feature_extractor (a CLIPImageProcessor), which the source lacks")
    crop = CLIPImageConfig.from_dict(fe.to_dict()).crop_hw
    size = int(checker.config.vision_config.image_size)
    if tuple(crop) != (size, size):
        raise UnsupportedModelError(f"--safety-checker: the feature extractor crops to {crop[0]}x{crop[1]} but the "
                                    f"checker's CLIP vision model takes {size}x{size} images")
    spec = C.image_encoder_spec(image_size=(size, size), embedding_dim=int(checker.config.projection_dim),
                                name=COMPONENT)
    plan = ComponentPlan(spec, SafetyCheckerWrapper(checker).eval(), {"pixel_values": (-2, 2)})
    return SafetyExport(checker, fe, plan)

