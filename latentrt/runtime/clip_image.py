"""CLIP's image preprocessing (``transformers.CLIPImageProcessor``) in numpy + PIL.

The image variation pipeline feeds a CLIP vision encoder: convert to RGB (transparency composited
onto white), resize the shortest side with bicubic, center crop, rescale by 1/255 and normalize
with CLIP's mean/std, giving float32 NCHW ``pixel_values``. This reproduces the PIL backend of
transformers 5 (what diffusers' ``StableUnCLIPImg2ImgPipeline`` gets where torchvision is absent, and
the numerics of transformers 4's ``CLIPImageProcessor``) step by step: PIL does the resampling, and
rescale / normalize follow its dtypes (float64 rescale, float32 normalize).

Settings come from a bundle's ``feature_extractor/preprocessor_config.json`` (both the current
``{"shortest_edge": N}`` / ``{"height", "width"}`` forms and the old plain-int form are read).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

try:
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

from .image import ImageInputError, check_pil, decoding

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3


@dataclass(frozen=True)
class CLIPImageConfig:
    shortest_edge: int | None = 224  # resize so the shorter side has this length (aspect kept) ...
    size_hw: tuple[int, int] | None = None  # ... or to exactly (height, width)
    crop_hw: tuple[int, int] = (224, 224)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = BICUBIC

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPImageConfig":
        size = d.get("size", {"shortest_edge": 224})
        shortest, size_hw = None, None
        if isinstance(size, (int, float)):
            shortest = int(size)
        elif isinstance(size, Mapping) and size.get("shortest_edge"):
            shortest = int(size["shortest_edge"])
        elif isinstance(size, Mapping) and size.get("height") and size.get("width"):
            size_hw = (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(f"unsupported CLIP image processor size {size!r}: expected shortest_edge or height/width")
        crop = d.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, (int, float)):
            crop_hw = (int(crop), int(crop))
        else:
            crop_hw = (int(crop["height"]), int(crop["width"]))
        return cls(
            shortest_edge=shortest, size_hw=size_hw, crop_hw=crop_hw,
            do_resize=bool(d.get("do_resize", True)), do_center_crop=bool(d.get("do_center_crop", True)),
            do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)), do_convert_rgb=bool(d.get("do_convert_rgb", True)),
            image_mean=tuple(float(x) for x in d.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(float(x) for x in d.get("image_std", OPENAI_CLIP_STD)),
            resample=int(d.get("resample", BICUBIC)),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "CLIPImageConfig":
        path = Path(path) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; re-export the bundle")
        return cls.from_dict(json.loads(path.read_text()))

    def output_size(self) -> tuple[int, int]:
        return self.crop_hw if self.do_center_crop else (self.size_hw or (0, 0))


def _to_rgb_pil(img):
    """transformers' ``convert_to_rgb``: transparency is composited onto white, then RGB."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _uint8_to_rgb(a: np.ndarray) -> np.ndarray:
    """transformers' numpy ``convert_to_rgb`` for uint8 HWC arrays (alpha blended onto white)."""
    if a.ndim == 2:
        a = a[:, :, None]
    c = a.shape[-1]
    if c == 1:
        return np.repeat(a, 3, axis=-1)
    if c == 4:
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    if c == 3:
        return a
    raise ImageInputError(f"image array has {c} channels (shape {a.shape}); expected 1, 3 or 4 channels last")


def resize_shape(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``shortest_edge`` (the longer one truncated, as transformers)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop(chw: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """transformers' ``center_crop`` (zero padding when the image is smaller than the crop)."""
    h, w = chw.shape[-2:]
    ch, cw = crop_hw
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return chw[..., top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    out = np.zeros(chw.shape[:-2] + (nh, nw), chw.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    out[..., tp:tp + h, lp:lp + w] = chw
    top, left = top + tp, left + lp
    return out[..., max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def _one(image, cfg: CLIPImageConfig) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageInputError(
                f"image array has dtype {image.dtype}; pass uint8 pixels (HWC), a PIL image, or already "
                f"preprocessed float32 pixel_values of shape (N, 3, {cfg.crop_hw[0]}, {cfg.crop_hw[1]})"
            )
        if image.ndim not in (2, 3):
            raise ImageInputError(f"image array has shape {image.shape}; expected HW or HWC")
        rgb = _uint8_to_rgb(image) if cfg.do_convert_rgb else image
        pil = Image.fromarray(np.ascontiguousarray(rgb))
    elif Image is not None and isinstance(image, Image.Image):
        check_pil(image)
        with decoding():
            pil = _to_rgb_pil(image) if cfg.do_convert_rgb else image
            pil.load()
    else:
        raise ImageInputError(
            f"image must be a PIL image, a uint8 numpy array or a list of them; got {type(image).__name__}"
        )
    if cfg.do_resize:
        h, w = cfg.size_hw or resize_shape(pil.height, pil.width, cfg.shortest_edge)
        pil = pil.resize((w, h), resample=cfg.resample)
    chw = np.asarray(pil)
    chw = (chw[None] if chw.ndim == 2 else chw.transpose(2, 0, 1))
    if cfg.do_center_crop:
        chw = center_crop(chw, cfg.crop_hw)
    x = chw
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
        mean = np.asarray(cfg.image_mean, dtype=x.dtype)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=x.dtype)[:, None, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def is_pixel_values(image: Any, cfg: CLIPImageConfig) -> bool:
    """A float NCHW array already preprocessed (diffusers passes a tensor image straight to the encoder)."""
    return (isinstance(image, np.ndarray) and image.ndim == 4 and image.dtype.kind == "f"
            and image.shape[1] == 3 and tuple(image.shape[2:]) == tuple(cfg.crop_hw))


def clip_preprocess(images: Any, cfg: CLIPImageConfig) -> np.ndarray:
    """PIL image(s) or uint8 array(s) -> float32 ``pixel_values`` (N, 3, crop_h, crop_w)."""
    if is_pixel_values(images, cfg):
        return np.asarray(images, dtype=np.float32)
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ImageInputError("image is an empty list")
    return np.stack([_one(i, cfg) for i in items])
