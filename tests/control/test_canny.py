"""latentrt.runtime.control.canny equals cv2.Canny (aperture 3, L1 gradient) pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.runtime.control import canny, canny_image

cv2 = pytest.importorskip("cv2")


def natural(h: int, w: int, seed: int) -> np.ndarray:
    """Discs of flat colour over a soft wave, with sensor-like noise: edges, flat areas and texture."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3))
    for _ in range(6):
        cy, cx, rad = r.uniform(0, h), r.uniform(0, w), r.uniform(5, 30)
        img[(y - cy) ** 2 + (x - cx) ** 2 < rad ** 2] = r.uniform(0, 255, 3)
    img += 40 * np.sin(x / 7.0)[..., None] + r.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


rng = np.random.default_rng(0)
IMAGES = {
    "random-gray": rng.integers(0, 256, (40, 50), dtype=np.uint8),
    "random-rgb": rng.integers(0, 256, (37, 41, 3), dtype=np.uint8),
    "natural-rgb": natural(128, 160, 1),
    "natural-gray": natural(96, 96, 2).mean(axis=2).astype(np.uint8),
}
THRESHOLDS = [(100, 200), (50, 150), (10, 30), (200, 100), (80.7, 160.2), (400, 800)]


@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("low,high", THRESHOLDS)
def test_canny_equals_opencv(name, low, high):
    img = IMAGES[name]
    want = cv2.Canny(img, low, high)
    got = canny(img, low, high)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert 0 < int((want > 0).sum()) < want.size  # some edges, not all
    assert np.array_equal(got, want), f"{int((got != want).sum())} pixels differ"


def test_canny_image_is_the_rgb_edge_map_and_rejects_float():
    from PIL import Image

    img = IMAGES["natural-rgb"]
    out = canny_image(Image.fromarray(img), 100, 200)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out)[..., 1], cv2.Canny(img, 100, 200))
    with pytest.raises(ValueError, match="8-bit"):
        canny(img.astype(np.float32), 100, 200)
