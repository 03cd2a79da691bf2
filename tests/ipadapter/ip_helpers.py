"""Helpers of the IP-Adapter tests: references loaded from disk, runs with the same noise, pictures."""

from __future__ import annotations

import copy

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"


def from_disk(pipe, folder):
    """``pipe`` saved and loaded back by diffusers, as users load a checkpoint (the reference and the export source)."""
    import torch

    pipe.save_pretrained(str(folder))
    loaded = type(pipe).from_pretrained(str(folder), dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def export(pipe, out, **kw):
    """Export an in-memory pipeline (graphs unchecked: the parity tests compare whole images) and load it."""
    import latentrt
    from latentrt.export.bundle import export_bundle

    export_bundle(None, out, pipe=pipe, check="off", progress=lambda *_: None, **kw)
    return latentrt.load(out)


def picture(h: int = 64, w: int = 64, seed: int = 5):
    """A smooth random picture (blobs and a bar): the image prompt or an init image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        img[..., c] = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) * rng.uniform(5, 20))
    img[h // 3: h // 2, :] = 1.0
    return Image.fromarray((img * 255).astype(np.uint8))


def reference(cls, pipe, weight, **extra):
    """diffusers' ``cls`` over ``pipe``'s modules (a copy of its UNet) with the IP-Adapter file ``weight``
    loaded from disk by ``load_ip_adapter`` (its image encoder from the folder beside it)."""
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    parts.update(unet=copy.deepcopy(pipe.unet), image_encoder=None, feature_extractor=None, **extra)
    if "safety_checker" in parts:
        parts.update(safety_checker=None, requires_safety_checker=False)
    ref = cls(**parts)
    ref.load_ip_adapter(str(weight.parent), subfolder="", weight_name=weight.name)
    ref.set_progress_bar_config(disable=True)
    return ref


def sibling(cls, ref, **extra):
    """Another diffusers pipeline class over the same (IP-loaded) modules."""
    parts = {**ref.components, **extra}
    if "requires_safety_checker" in cls.__init__.__code__.co_varnames:
        parts["requires_safety_checker"] = False
    out = cls(**parts)
    out.set_progress_bar_config(disable=True)
    return out


def run(pipe, seed: int, torch_ref: bool, **kw):
    import torch

    from latentrt.runtime.random import TorchGeneratorNoise

    kw.setdefault("prompt", PROMPT)
    g = torch.Generator("cpu").manual_seed(seed) if torch_ref else TorchGeneratorNoise(seed)
    return pipe(**kw, generator=g, output_type="np").images


def assert_close(got, want, tol: float = 1e-4):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max abs image difference {err:.3g} > {tol}"


def assert_changes(a, b, min_diff: float = 2e-2):
    diff = float(np.abs(a - b).max())
    assert diff > min_diff, f"the image prompt changes diffusers' image by only {diff:.3g}"
