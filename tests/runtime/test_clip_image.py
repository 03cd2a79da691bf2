"""CLIP image preprocessing in numpy + PIL against transformers' CLIPImageProcessor (what diffusers'
StableUnCLIPImg2ImgPipeline calls; without torchvision transformers 5 uses its PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")

from latentrt.runtime.clip_image import CLIPImageConfig, clip_preprocess  # noqa: E402
from latentrt.runtime.image import ImageInputError  # noqa: E402

TOL = 1e-5


def photo_like(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients and blobs plus sensor-like noise, uint8 HWC."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for c in range(channels):
        fx, fy, ph = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.28)
        base = 0.5 + 0.3 * np.sin(2 * np.pi * fx * x / w + ph) * np.cos(2 * np.pi * fy * y / h)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        base += 0.3 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 * h * w))
        base += x / w * 0.2 * (c - 1) + rng.normal(0, 0.03, (h, w))
        out.append(base)
    return (np.clip(np.stack(out, -1), 0, 1) * 255).round().astype(np.uint8)


def reference(processor_kwargs, image):
    proc = transformers.CLIPImageProcessor(**processor_kwargs)
    return np.asarray(proc(images=image, return_tensors="np").pixel_values)


PROCESSORS = {
    "default-224": {},
    "tiny-32": {"crop_size": 32, "size": 32},
    "rect-size": {"size": {"height": 40, "width": 56}, "crop_size": {"height": 32, "width": 48}},
}

IMAGES = {
    "rgb-640x480": lambda: Image.fromarray(photo_like(480, 640, 0)),
    "rgb-portrait-333x517": lambda: Image.fromarray(photo_like(517, 333, 1)),
    "rgb-small-20x17": lambda: Image.fromarray(photo_like(17, 20, 2)),
    "rgba": lambda: Image.fromarray(photo_like(96, 128, 3, channels=4), mode="RGBA"),
    "gray-L": lambda: Image.fromarray(photo_like(150, 100, 4, channels=1)[..., 0], mode="L"),
    "palette-with-transparency": lambda: _palette(),
    "numpy-uint8-rgb": lambda: photo_like(64, 80, 6),
    "numpy-uint8-rgba": lambda: photo_like(64, 48, 7, channels=4),
}


def _palette():
    img = Image.fromarray(photo_like(70, 90, 5)).convert("P", palette=Image.ADAPTIVE, colors=32)
    img.info["transparency"] = 3
    return img


@pytest.mark.parametrize("proc", list(PROCESSORS))
@pytest.mark.parametrize("name", list(IMAGES))
def test_matches_clip_image_processor(proc, name):
    kwargs = PROCESSORS[proc]
    image = IMAGES[name]()
    want = reference(kwargs, image)
    cfg = CLIPImageConfig.from_dict(transformers.CLIPImageProcessor(**kwargs).to_dict())
    got = clip_preprocess(image, cfg)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_batch_of_mixed_sizes_and_saved_config(tmp_path):
    images = [IMAGES["rgb-640x480"](), IMAGES["gray-L"](), IMAGES["rgba"]()]
    proc = transformers.CLIPImageProcessor(crop_size=32, size=32)
    proc.save_pretrained(str(tmp_path))
    cfg = CLIPImageConfig.from_dir(tmp_path)
    want = np.asarray(proc(images=images, return_tensors="np").pixel_values)
    np.testing.assert_allclose(clip_preprocess(images, cfg), want, atol=TOL, rtol=0)
    # already preprocessed pixel values pass through
    assert clip_preprocess(want, cfg) is not None and np.array_equal(clip_preprocess(want, cfg), want)


def test_old_int_size_config():
    cfg = CLIPImageConfig.from_dict({"size": 48, "crop_size": 40, "resample": 3})
    assert cfg.shortest_edge == 48 and cfg.crop_hw == (40, 40)


def test_bad_inputs():
    cfg = CLIPImageConfig()
    with pytest.raises(ImageInputError, match="uint8"):
        clip_preprocess(np.zeros((32, 32, 3), np.float32), cfg)
    with pytest.raises(ImageInputError, match="channels"):
        clip_preprocess(np.zeros((32, 32, 2), np.uint8), cfg)
    with pytest.raises(ImageInputError, match="PIL image"):
        clip_preprocess("cat.png", cfg)
    with pytest.raises(ImageInputError, match="empty"):
        clip_preprocess([], cfg)
