"""Image I/O in numpy, matching diffusers' ``VaeImageProcessor`` (pre- and post-processing).

Accepted images: a PIL image, a numpy array (HWC or NHWC; float in [0, 1] or uint8; 1, 3 or 4
channels), an NCHW array already in [-1, 1] of 3 channels, or a list of these. Modes other than RGB
are converted (alpha is dropped as ``Image.convert("RGB")`` does; grayscale is repeated to three
channels). diffusers would take a 4-channel RGBA image for latents; here an image never silently
turns into latents: latents are passed as ``image`` only as a float NCHW array with the VAE's
latent channel count (handled by the pipelines, not here).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # pillow is a runtime dependency, but keep the numpy paths usable without it
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None


class ImageInputError(ValueError):
    """An image argument is of a type, mode, dtype or shape the pipeline cannot use."""


def _is_pil(x: Any) -> bool:
    return Image is not None and isinstance(x, Image.Image)


def _pil_to_float(img) -> np.ndarray:
    if img.mode not in ("RGB",):
        img = img.convert("RGB")  # RGBA drops alpha, L / P / CMYK become RGB
    return np.asarray(img, dtype=np.float32) / 255.0


def _array_to_nhwc(a: np.ndarray) -> np.ndarray:
    """A numpy image (HWC / NHWC, uint8 or float in [0, 1]) as float32 NHWC with 3 channels."""
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype in (np.float32, np.float64, np.float16):
        a = a.astype(np.float32)
    else:
        raise ImageInputError(
            f"image array has dtype {a.dtype}; pass uint8 (0-255) or float (0-1) pixels"
        )
    if a.ndim == 2:
        a = a[None, :, :, None]
    elif a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ImageInputError(f"image array has shape {a.shape}; expected HWC or NHWC")
    c = a.shape[-1]
    if c == 1:
        a = np.repeat(a, 3, axis=-1)
    elif c == 4:
        a = a[..., :3]
    elif c != 3:
        raise ImageInputError(
            f"image has {c} channels (shape {a.shape}); expected 1 (gray), 3 (RGB) or 4 (RGBA) channels last"
        )
    return a


def to_nchw(image: Any, *, vae_scale_factor: int = 8, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Preprocess like ``VaeImageProcessor.preprocess``: float32 NCHW in [-1, 1].

    Sizes are rounded down to a multiple of ``vae_scale_factor`` (PIL images are resized with
    Lanczos as diffusers does; arrays must already have a valid size).
    """
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ImageInputError("image is an empty list")
    if all(_is_pil(i) for i in images):
        w0, h0 = images[0].size
        h = height or h0 - h0 % vae_scale_factor
        w = width or w0 - w0 % vae_scale_factor
        resized = [i if i.size == (w, h) else i.resize((w, h), resample=Image.LANCZOS) for i in images]
        nhwc = np.stack([_pil_to_float(i) for i in resized])
    elif all(isinstance(i, np.ndarray) for i in images):
        if len(images) == 1 and images[0].ndim == 4 and images[0].shape[1] in (3,) and images[0].shape[-1] not in (1, 3, 4):
            nchw = images[0].astype(np.float32)  # already NCHW in [-1, 1]
            _check_size(nchw.shape[2], nchw.shape[3], vae_scale_factor)
            return nchw
        nhwc = np.concatenate([_array_to_nhwc(i) for i in images], axis=0)
        _check_size(nhwc.shape[1], nhwc.shape[2], vae_scale_factor)
    else:
        kinds = sorted({type(i).__name__ for i in images})
        raise ImageInputError(
            f"image must be a PIL image, a numpy array or a list of one of them; got {', '.join(kinds)}"
        )
    if nhwc.min() < 0 or nhwc.max() > 1:
        raise ImageInputError(
            f"image pixel values span [{nhwc.min():.3g}, {nhwc.max():.3g}]; float images must be in [0, 1]"
        )
    return np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)) * 2.0 - 1.0


def _check_size(h: int, w: int, factor: int) -> None:
    if h % factor or w % factor:
        raise ImageInputError(
            f"image size {h}x{w} (HxW) is not a multiple of {factor}; crop or resize it "
            f"(for example to {h - h % factor}x{w - w % factor})"
        )


def postprocess(image_nchw: np.ndarray, output_type: str = "pil"):
    """``VaeImageProcessor.postprocess``: [-1, 1] NCHW -> NHWC floats in [0, 1] or PIL images."""
    x = np.clip(np.asarray(image_nchw, dtype=np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    if output_type == "np":
        return x
    if output_type == "pil":
        if Image is None:  # pragma: no cover
            raise ImportError("output_type='pil' needs pillow; pip install pillow or use output_type='np'")
        return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]
    raise ValueError(f"output_type must be 'pil', 'np' or 'latent'; got {output_type!r}")
