"""Device-resident latents in the denoising loop.

The loop (:func:`latentrt.runtime.pipelines.guidance.denoise`) keeps ``latents`` as device tensors
between steps when the UNet engine can return them (``Engine.device_loop``: the torch backend on
CUDA) and the scheduler's step is element-wise arithmetic that runs on torch tensors as it does on
numpy arrays (``Scheduler.device_loop``, checked against the numpy loop in the tests). Then a step
copies nothing but its noise to the device: the noise is still drawn on the host from the call's
noise source, so the randomness contract (same seed, same image on every backend) holds. The
latents come back to the host once, after the loop. Everything else falls back to the host loop.

Callbacks see device tensors in this mode (``latents``, ``denoised``; ``prompt_embeds`` stays what
the pipeline passed in).
"""

from __future__ import annotations

import numpy as np


def use_device_loop(engine, scheduler, guidance_rescale: float = 0.0) -> bool:
    """Whether the loop can keep its latents on ``engine``'s device with ``scheduler``."""
    return bool(getattr(engine, "device_loop", False)) and bool(getattr(scheduler, "device_loop", False)) \
        and not guidance_rescale  # the rescale statistics run in numpy


def like(ref, array):
    """``array`` (numpy) as the array type of ``ref``: itself for numpy, a tensor on ref's device for torch."""
    if ref is None or isinstance(ref, np.ndarray) or not hasattr(ref, "device") or not isinstance(array, np.ndarray):
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(ref.device)


def to_host(x):
    """A float32 numpy array of ``x`` (numpy or a device tensor)."""
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.detach().float().cpu().numpy()


def concat2(x):
    """``[x; x]`` along the batch (classifier-free guidance), for numpy arrays and torch tensors."""
    if isinstance(x, np.ndarray):
        return np.concatenate([x, x], axis=0)
    import torch

    return torch.cat([x, x], dim=0)
