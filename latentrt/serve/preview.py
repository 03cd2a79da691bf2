"""Cheap step previews: latents -> a small RGB image by a fixed linear map (no VAE).

The 4x3 map approximates SD 1.x/2.x's VAE decoder on the latent grid (the factors ComfyUI and A1111
use for their "approx" previews); other latent widths fall back to their first three channels.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

#: latent channel -> RGB, for 4-channel SD latents (scaled by the VAE's scaling factor)
SD_LATENT_RGB = np.array([[0.3512, 0.2297, 0.3227],
                          [0.3250, 0.4974, 0.2350],
                          [-0.2829, 0.1762, 0.2721],
                          [-0.2120, -0.2616, -0.7177]], dtype=np.float32)


def latent_preview(latents: np.ndarray) -> list[Image.Image]:
    """NCHW latents -> one PIL image per latent, at the latent grid's size."""
    x = np.asarray(latents, dtype=np.float32)
    if x.shape[1] == SD_LATENT_RGB.shape[0]:
        rgb = np.einsum("nchw,cd->nhwd", x, SD_LATENT_RGB)
    else:
        rgb = x[:, :3].transpose(0, 2, 3, 1) * 0.25
    rgb = np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in rgb]


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
