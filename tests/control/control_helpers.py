"""Helpers of the conditioning tests: export, run with the same noise, compare, a control picture."""

from __future__ import annotations

import numpy as np
import pytest

PROMPT = "a photograph of an astronaut riding a horse"


def export(pipe, out, **kw):
    import latentrt
    from latentrt.export.bundle import export_bundle

    export_bundle(None, out, pipe=pipe, check="quick", progress=lambda *_: None, **kw)
    return latentrt.load(out)


def control_picture(h: int = 64, w: int = 64, seed: int = 5, mode: str = "RGB"):
    """A smooth picture with edges (blobs and a bar), like a depth map or a soft edge map."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        img[..., c] = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) * rng.uniform(5, 20))
    img[h // 3: h // 2, :] = 1.0
    pil = Image.fromarray((img * 255).astype(np.uint8))
    return pil.convert(mode)


def run(pipe, seed: int, torch_ref: bool, **kw):
    import torch

    from latentrt.runtime.random import TorchGeneratorNoise

    kw.setdefault("prompt", PROMPT)
    g = torch.Generator("cpu").manual_seed(seed) if torch_ref else TorchGeneratorNoise(seed)
    if torch_ref:
        pipe.set_progress_bar_config(disable=True)
    return pipe(**kw, generator=g, output_type="np").images


def assert_close(got, want, tol: float):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max abs image difference {err:.3g} > {tol}"


def assert_changes(with_control, without, min_diff: float = 2e-2):
    """The conditioning visibly changes diffusers' own image (so the parity check is not blind)."""
    diff = float(np.abs(with_control - without).max())
    assert diff > min_diff, f"the control changes diffusers' image by only {diff:.3g}"


def sd_components(pipe) -> dict:
    return dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl_components(pipe) -> dict:
    return dict(vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, scheduler=pipe.scheduler)
