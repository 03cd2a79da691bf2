"""Conditioning preprocessors in numpy (no OpenCV): Canny edges for ControlNets and T2I-Adapters.

:func:`canny` reproduces ``cv2.Canny(image, low, high)`` (aperture 3, ``L2gradient=False``) pixel for
pixel: 3x3 Sobel derivatives with replicated borders (on a colour image, per pixel the channel with the
largest ``|dx| + |dy|``, the first on ties), the L1 magnitude, non-maximum suppression in four
directions with OpenCV's fixed-point tan(22.5 deg) test (neighbours outside the image count as 0;
ties go to the later pixel along the direction for horizontal and vertical edges), thresholds floored
to integers, then 8-connected hysteresis from the pixels above ``high`` through those above ``low``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel dx, dy (int32) with BORDER_REPLICATE, per channel: (H, W, C) -> (H, W, C) each."""
    p = np.pad(img.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth_y = p[:-2] + 2 * p[1:-1] + p[2:]  # vertical [1 2 1]
    dx = smooth_y[:, 2:] - smooth_y[:, :-2]
    smooth_x = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
    dy = smooth_x[2:] - smooth_x[:-2]
    return dx, dy


def _as_uint8(image: Any) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = np.asarray(image.convert("L") if image.mode not in ("L", "RGB") else image)
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"canny takes 8-bit images (uint8 arrays or PIL images); got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"canny takes an HxW or HxWxC image; got shape {a.shape}")
    return a


def canny(image: Any, low: float, high: float) -> np.ndarray:
    """``cv2.Canny(image, low, high)``: a uint8 HxW edge map (255 on edges) of a uint8 gray or
    colour image (HxW, HxWxC; a PIL image is read as RGB or L)."""
    a = _as_uint8(image)
    if low > high:
        low, high = high, low
    low_i, high_i = int(np.floor(low)), int(np.floor(high))
    dx, dy = _sobel(a)
    norm = np.abs(dx) + np.abs(dy)
    if a.shape[2] > 1:  # the strongest channel per pixel (the first one on ties)
        best = np.argmax(norm, axis=2)[..., None]
        dx, dy, norm = (np.take_along_axis(x, best, axis=2) for x in (dx, dy, norm))
    dx, dy, mag = dx[..., 0], dy[..., 0], norm[..., 0]
    h, w = mag.shape
    m = np.pad(mag, 1)  # neighbours outside the image are 0

    def at(oy, ox):
        return m[1 + oy: 1 + oy + h, 1 + ox: 1 + ox + w]

    x, y = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << _SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    s = np.where((dx ^ dy) < 0, -1, 1)
    left, right, top, bottom = at(0, -1), at(0, 1), at(-1, 0), at(1, 0)
    keep = np.where(horizontal, (mag > left) & (mag >= right), False)
    keep |= vertical & (mag > top) & (mag >= bottom)
    diag_a = np.where(s < 0, at(-1, 1), at(-1, -1))  # row above, column j - s
    diag_b = np.where(s < 0, at(1, -1), at(1, 1))  # row below, column j + s
    keep |= diagonal & (mag > diag_a) & (mag > diag_b)
    candidate = keep & (mag > low_i)
    strong = candidate & (mag > high_i)
    return (_hysteresis(strong, candidate) * 255).astype(np.uint8)


def _hysteresis(strong: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Candidates 8-connected (through candidates) to a strong pixel."""
    h, w = strong.shape
    out = strong.copy()
    stack = list(zip(*np.nonzero(strong)))
    cand = np.pad(candidate, 1)
    done = np.pad(out, 1)
    while stack:
        i, j = stack.pop()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                ii, jj = i + di + 1, j + dj + 1
                if cand[ii, jj] and not done[ii, jj]:
                    done[ii, jj] = True
                    stack.append((ii - 1, jj - 1))
    return done[1:-1, 1:-1]


def canny_image(image: Any, low: float, high: float):
    """:func:`canny` as the RGB PIL image ControlNet canny models take (edges white on black)."""
    from PIL import Image

    edges = canny(image, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
