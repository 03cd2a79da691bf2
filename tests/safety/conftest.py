"""Fixtures of the safety-checker tests: tiny LCM and SD pipelines carrying a tiny random safety
checker whose concept data flags the first of two images and not the second, saved to disk, loaded
back by diffusers (the reference) and exported to bundles."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "serve"))  # serve_helpers (the HTTP tests)

from safety_helpers import SEED, aimed_concepts, call_of, set_concepts, tiny_checker, torch_embeds  # noqa: E402

@dataclass
class Case:
    kind: str
    folder: Path  # the diffusers pipeline with its checker, as save_pretrained wrote it
    bundle: Path
    plain: np.ndarray  # diffusers' images without a checker
    ref: object  # diffusers' output with the checker (images, nsfw_content_detected)


def _build(kind: str, root: Path) -> Case:
    import torch
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import tiny_lcm_pipeline, tiny_sd_pipeline

    from diffusers import LatentConsistencyModelImg2ImgPipeline

    cls = {"lcm": LatentConsistencyModelPipeline, "sd": StableDiffusionPipeline,
           "lcm-img2img": LatentConsistencyModelImg2ImgPipeline}[kind]
    base = cls(**{"lcm": tiny_lcm_pipeline, "sd": tiny_sd_pipeline}[kind.split("-")[0]](0).components)
    base.set_progress_bar_config(disable=True)
    call = call_of(kind)
    plain = base(**call, generator=torch.Generator().manual_seed(SEED)).images
    checker, fe = tiny_checker()
    e = torch_embeds(checker, fe, plain)
    set_concepts(checker, aimed_concepts(e[0], e[1]))
    cls(**{**base.components, "safety_checker": checker, "feature_extractor": fe},
        requires_safety_checker=True).save_pretrained(str(root / "model"), safe_serialization=True)
    ref_pipe = cls.from_pretrained(str(root / "model"), dtype=torch.float32)  # the reference loads from disk
    ref_pipe.set_progress_bar_config(disable=True)
    assert type(ref_pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    ref = ref_pipe(**call, generator=torch.Generator().manual_seed(SEED))
    export_bundle(root / "model", root / "bundle", check="off", progress=lambda *_: None)  # default: auto
    return Case(kind, root / "model", root / "bundle", plain, ref)


@pytest.fixture(scope="session")
def safe_cases(tmp_path_factory):
    cache: dict[str, Case] = {}

    def get(kind: str) -> Case:
        if kind not in cache:
            cache[kind] = _build(kind, tmp_path_factory.mktemp(f"safety-{kind}"))
        return cache[kind]

    return get
