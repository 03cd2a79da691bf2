"""What a scenario's pipeline does (its ``task``), one table row per task, so the one measuring loop of
:mod:`.harness` (and of its child processes and memory probe) serves every pipeline:

* ``text-to-image`` (the default): LCM, SD, SDXL bundles, against ``LatentConsistencyModelPipeline`` /
  ``StableDiffusionXLPipeline``;
* ``upscale``: the x2 latent upscaler (``latent_upscale`` bundles, ``StableDiffusionLatentUpscalePipeline``).
  The scenario's ``height`` x ``width`` is the *output*; the input is an image of half that size, which
  both systems encode with the VAE (stage ``vae_encoder``);
* ``unclip``: Stable unCLIP text-to-image through the prior (``unclip`` bundles, ``StableUnCLIPPipeline``);
* ``unclip-variation``: Stable unCLIP image variations (``unclip_img2img`` bundles,
  ``StableUnCLIPImg2ImgPipeline``), the input image at the output size (the CLIP image processor
  resizes it to its 224 pixels on both sides).

Both systems get the same keyword arguments (latentrt's pipelines take diffusers' names) and the very
same input image, :func:`input_image`: a fixed, seeded picture (a smooth colour field plus
Gaussian noise from ``numpy.random.default_rng(scenario seed)``), so images can be compared (PSNR)
as well as timed. latentrt alone adds what only it has (``vae``, ``vae_tiling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXT_TO_IMAGE = "text-to-image"


@dataclass(frozen=True)
class Task:
    #: the bundle kinds (manifest ``pipeline``) that run it; None: any kind no other task claims
    kinds: tuple[str, ...] | None
    #: the diffusers classes (``model_index.json`` ``_class_name``) its baseline runs
    diffusers: tuple[str, ...]
    #: the input image's size: None (no image), "half" (half the output, the upscaler) or "full"
    image: str | None = None
    #: the call takes height, width and num_images_per_prompt (the upscaler's size is its input's)
    sized: bool = True


TASKS = {
    TEXT_TO_IMAGE: Task(None, ("LatentConsistencyModelPipeline", "StableDiffusionXLPipeline")),
    "upscale": Task(("latent_upscale",), ("StableDiffusionLatentUpscalePipeline",), image="half", sized=False),
    "unclip": Task(("unclip",), ("StableUnCLIPPipeline",)),
    "unclip-variation": Task(("unclip_img2img",), ("StableUnCLIPImg2ImgPipeline",), image="full"),
}
#: every diffusers class a baseline runs (``baseline.PIPELINE_CLASSES``)
DIFFUSERS_CLASSES = tuple(c for t in TASKS.values() for c in t.diffusers)


def task_of(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def task_for_kind(kind: str) -> str:
    """The task that runs bundles of pipeline kind ``kind``."""
    return next((n for n, t in TASKS.items() if t.kinds and kind in t.kinds), TEXT_TO_IMAGE)


def check_bundle(sc, bundle) -> None:
    """Refuse a scenario whose bundle is not a pipeline of its task, naming the task that fits."""
    import json
    from pathlib import Path

    kind = json.loads((Path(bundle) / "latentrt.json").read_text()).get("pipeline")
    fits = task_for_kind(str(kind))
    if fits != sc.task:
        raise ValueError(f"scenario {sc.name!r}: task {sc.task!r} does not run model {sc.model!r}, a {kind!r} bundle; "
                         f"set task = {fits!r} or pick a model of the task "
                         f"({'latentrt.json pipeline ' + ' / '.join(TASKS[sc.task].kinds) if TASKS[sc.task].kinds else 'a text-to-image bundle'})")


def input_image(sc):
    """The task's input image (PIL, RGB), or None: a smooth colour field plus noise, both from the
    scenario's seed, at half the output size (upscale) or at the output size (variation)."""
    t = task_of(sc.task)
    if t.image is None:
        return None
    from PIL import Image

    h, w = (sc.height // 2, sc.width // 2) if t.image == "half" else (sc.height, sc.width)
    rng = np.random.default_rng(sc.seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 2 * np.pi, 3)
    field = np.stack([np.sin(6 * x + phase[0]), np.cos(5 * y + phase[1]), np.sin(4 * (x + y) + phase[2])], -1)
    pixels = np.clip(field * 0.35 + 0.5 + rng.normal(0, 0.05, field.shape), 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def pipe_kwargs(sc, image=None) -> dict:
    """Keyword arguments of one call, the same for latentrt and diffusers (prompt and generator apart)."""
    t = task_of(sc.task)
    kw = dict(num_inference_steps=sc.steps, guidance_scale=sc.guidance, output_type="np")
    if t.sized:
        kw.update(height=sc.height, width=sc.width, num_images_per_prompt=sc.batch)
    if t.image is not None:
        kw["image"] = image if image is not None else input_image(sc)
    return kw


def latentrt_kwargs(sc, image=None) -> dict:
    """:func:`pipe_kwargs` plus latentrt's own choices: the VAE (TAESD) and VAE tiling."""
    kw = pipe_kwargs(sc, image)
    if sc.vae != "full":  # pipelines without a VAE choice keep working with the default
        kw["vae"] = sc.vae
    if sc.vae_tiling:
        kw["vae_tiling"] = True
    return kw
