"""Image I/O in numpy, matching diffusers' ``VaeImageProcessor`` (pre- and post-processing).

Accepted images: a PIL image, a numpy array (HWC or NHWC; float in [0, 1] or uint8; 1, 3 or 4
channels), an NCHW array already in [-1, 1] of 3 channels, or a list of these. Modes other than RGB
are converted (alpha is dropped as ``Image.convert("RGB")`` does; grayscale is repeated to three
channels). diffusers would take a 4-channel RGBA image for latents; here an image never silently
turns into latents: latents are passed as ``image`` only as a float NCHW array with the VAE's
latent channel count (handled by the pipelines, not here).
"""

from __future__ import annotations

import contextlib
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


#: the most pixels an input image may have: PIL's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``)
MAX_PIXELS = getattr(Image, "MAX_IMAGE_PIXELS", None) or 89_478_485
#: integer modes of more than 8 bits, scaled from their 16-bit range (``convert("RGB")`` would clip them)
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def check_pil(img, what: str = "image") -> None:
    """Refuse a PIL image too large to decode safely, before its pixels are read."""
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageInputError(f"{what} is empty ({w}x{h} pixels)")
    if w * h > MAX_PIXELS:
        raise ImageInputError(
            f"{what} is {w}x{h} ({w * h / 1e6:.0f} megapixels), more than the {MAX_PIXELS / 1e6:.0f} megapixels "
            "latentrt decodes (PIL's decompression-bomb guard); resize it first"
        )


@contextlib.contextmanager
def decoding():
    """PIL decodes files lazily, at the first pixel access: a truncated or corrupt file fails there,
    with PIL's OSError / ValueError, which becomes an :class:`ImageInputError`."""
    try:
        yield
    except ImageInputError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageInputError(f"the image could not be decoded ({type(e).__name__}: {e}); pass a valid image file "
                              "(PNG, JPEG, WebP, ...) or an array") from None


def _pil_to_float(img) -> np.ndarray:
    with decoding():
        if img.mode in _WIDE_INT_MODES:  # 16-bit grayscale: keep its range instead of clipping at 255
            gray = np.asarray(img, dtype=np.float32) / 65535.0
            return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
        if img.mode == "F":
            gray = np.asarray(img, dtype=np.float32)
            if not np.isfinite(gray).all() or gray.min() < 0 or gray.max() > 1:
                raise ImageInputError("a float ('F' mode) image must have finite pixels in [0, 1]")
            return np.repeat(gray[..., None], 3, axis=-1)
        if img.mode not in ("RGB",):
            img = img.convert("RGB")  # RGBA drops alpha, L / P / CMYK become RGB
        return np.asarray(img, dtype=np.float32) / 255.0


def load_image(path) -> "Image.Image":
    """An image file as a PIL image, as diffusers' ``load_image`` gives it (EXIF orientation applied,
    RGB; 16-bit grayscale and float images keep their mode, so their range survives), with a clear
    :class:`ImageInputError` for files that are not images, truncated or too large (decompression bombs)."""
    import warnings

    from PIL import ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageInputError(f"{path}: refusing to decode it ({e}); resize it first") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise ImageInputError(f"{path}: not a readable image ({type(e).__name__}: {e}); pass a PNG, JPEG or "
                              "WebP file") from None
    check_pil(img, str(path))
    with decoding():
        img = ImageOps.exif_transpose(img)
        img.load()
        return img if img.mode in ("RGB", "F", *_WIDE_INT_MODES) else img.convert("RGB")


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
        for i in images:
            check_pil(i)
        w0, h0 = images[0].size
        h = height or h0 - h0 % vae_scale_factor
        w = width or w0 - w0 % vae_scale_factor
        if h < vae_scale_factor or w < vae_scale_factor:
            f = vae_scale_factor
            raise ImageInputError(f"image is {w0}x{h0} pixels; it must be at least {f}x{f} (sizes are rounded down "
                                  f"to a multiple of {f})")
        nhwc = np.stack([_pil_to_float(_resized(i, w, h)) for i in images])
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
    if not np.isfinite(nhwc).all() or nhwc.min() < 0 or nhwc.max() > 1:
        raise ImageInputError(
            f"image pixel values span [{nhwc.min():.3g}, {nhwc.max():.3g}]; float images must be in [0, 1]"
        )
    return np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)) * 2.0 - 1.0


def _resized(img, w: int, h: int):
    if img.size == (w, h):
        return img
    with decoding():
        return img.resize((w, h), resample=Image.LANCZOS)


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
