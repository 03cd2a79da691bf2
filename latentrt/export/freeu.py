"""FreeU (issue 17) as a graph input of the UNet: ``freeu = (s1, s2, b1, b2)``, float32 (4,).

diffusers' ``unet.enable_freeu(s1, s2, b1, b2)`` makes the first two up blocks (``resolution_idx`` 0
and 1, when they are ``UpBlock2D`` / ``CrossAttnUpBlock2D``) call ``apply_freeu`` before each resnet:
the first half of the backbone channels is multiplied by ``b1`` / ``b2`` and the skip tensor goes
through ``fourier_filter(x, threshold=1, scale=s1 / s2)``.

That filter (FFT, fftshift, multiply a 2x2 block around the centre by ``scale``, inverse, real part)
keeps exactly two Fourier modes per axis: the centre index ``H // 2`` of the shifted spectrum is
frequency 0 and the one before it frequency -1, for even and odd sides alike (one mode when the side
is 1, where diffusers' slice ``[-1:1]`` holds one element). So

    fourier_filter(x, 1, s) = x + (s - 1) * Re(P_H x P_W^T),   P_N = (1 + w e^{-i theta}) / N,

with ``theta[m, n] = 2 pi (m - n) / N`` and ``w = min(N - 1, 1)``. With ``P_N = A - iB`` (A = (1 + w cos
theta) / N, B = w sin theta / N), ``Re(P_H x P_W^T) = A_H x A_W^T - B_H x B_W^T``: four small real matrix
products whose matrices are built in the graph from the tensor's dynamic H and W (cumsum / cos / sin),
so one graph serves every latent size. diffusers computes the filter in float32 and casts back, as
:func:`fourier_filter` does. diffusers' own filter does not export: the TorchScript exporter the bundles
use says "Exporting the operator 'aten::fft_fftn' to ONNX opset version 17 is not supported"; the
products are exact and cost almost nothing at the UNet's two lowest resolutions.

With the identity ``(1, 1, 1, 1)`` the graph computes diffusers' result without FreeU exactly
(``x * 1`` and ``x + 0 * ...``): the runtime feeds it whenever a call does not ask for FreeU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from ..spec import TensorSpec

#: the UNet graph input
FREEU_INPUT = "freeu"
#: the values the exporter's check draws (diffusers' recommended ranges sit inside)
VALUE_RANGE = (0.2, 1.6)


def _mode_projection(line: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), the real and minus the imaginary part of the projection onto Fourier modes 0 and -1 of a
    side of length ``N = len(line)``, built from ``line``'s dynamic length."""
    ones = torch.ones_like(line)
    n = ones.sum()
    idx = torch.cumsum(ones, 0) - 1
    theta = (idx[:, None] - idx[None, :]) * (2 * math.pi) / n
    w = torch.clamp(n - 1, max=1.0)  # N = 1: modes 0 and -1 are the same one
    return (1 + w * torch.cos(theta)) / n, w * torch.sin(theta) / n


def fourier_filter(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diffusers' ``fourier_filter(x, threshold=1, scale)`` without an FFT (see the module docstring)."""
    x32 = x.to(torch.float32)
    a_h, b_h = _mode_projection(x32[0, 0, :, 0])
    a_w, b_w = _mode_projection(x32[0, 0, 0, :])
    low = torch.matmul(torch.matmul(a_h, x32), a_w.transpose(0, 1)) - torch.matmul(
        torch.matmul(b_h, x32), b_w.transpose(0, 1))
    return (x32 + (scale.to(torch.float32) - 1) * low).to(x.dtype)


def _apply_freeu(freeu: torch.Tensor):
    """diffusers' ``apply_freeu`` reading (s1, s2, b1, b2) from the tensor ``freeu``."""

    def apply(resolution_idx, hidden_states, res_hidden_states, **_ignored):
        if resolution_idx not in (0, 1):
            return hidden_states, res_hidden_states
        s, b = freeu[resolution_idx], freeu[2 + resolution_idx]
        half = hidden_states.shape[1] // 2
        hidden_states = torch.cat([hidden_states[:, :half] * b.to(hidden_states.dtype), hidden_states[:, half:]], 1)
        return hidden_states, fourier_filter(res_hidden_states, s)

    return apply


@contextlib.contextmanager
def freeu_from_input(unet, freeu: torch.Tensor):
    """Trace (or run) ``unet`` with FreeU taking its factors from the tensor ``freeu``: the up blocks get
    truthy placeholder factors (so diffusers' ``is_freeu_enabled`` branch runs) and diffusers'
    ``apply_freeu`` is replaced by one that reads the tensor; both are restored afterwards."""
    from diffusers.models.unets import unet_2d_blocks as blocks

    keys = ("s1", "s2", "b1", "b2")
    saved_attrs = [{k: getattr(b, k, None) for k in keys} for b in unet.up_blocks]
    saved_apply = blocks.apply_freeu
    for block in unet.up_blocks:
        for k in keys:
            setattr(block, k, 1.0)
    blocks.apply_freeu = _apply_freeu(freeu)
    try:
        yield unet
    finally:
        blocks.apply_freeu = saved_apply
        for block, attrs in zip(unet.up_blocks, saved_attrs):
            for k, v in attrs.items():
                setattr(block, k, v)


class FreeUWrapper(torch.nn.Module):
    """A UNet wrapper (``UNetWrapper``, ``SDXLUNetWrapper``, the residual ones) whose spec also takes
    ``freeu``: runs the inner wrapper under :func:`freeu_from_input`."""

    def __init__(self, inner, input_names):
        super().__init__()
        self.inner = inner
        self.inner.input_names = tuple(input_names)  # the inner wrapper ignores names it does not know
        self.index = list(input_names).index(FREEU_INPUT)

    def forward(self, *args):
        with freeu_from_input(self.inner.unet, args[self.index]):
            return self.inner(*args)


def is_unet_plan(plan) -> bool:
    return plan.spec.name == "unet" or plan.spec.name.startswith("unet_")


def freeu_spec(spec):
    """A UNet ``spec`` with the ``freeu`` input, float32 (4,), last."""
    return dataclasses.replace(spec, inputs=(*spec.inputs, TensorSpec(FREEU_INPUT, "float32", (4,))))


def with_freeu_input(plan):
    """The UNet ``plan`` (a :class:`~latentrt.export.recipes.ComponentPlan`) with the ``freeu`` input."""
    from .recipes import ComponentPlan

    spec = freeu_spec(plan.spec)
    return ComponentPlan(spec, FreeUWrapper(plan.module, [s.name for s in spec.inputs]),
                         {**plan.value_ranges, FREEU_INPUT: VALUE_RANGE})


def add_freeu_inputs(plans: list) -> list:
    """Every UNet graph of ``plans`` (``unet`` and the ControlNet / adapter ones) with the ``freeu``
    input; refuses a pipeline none of whose UNets has an up block FreeU acts on."""
    from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D

    out, found = [], False
    for plan in plans:
        if is_unet_plan(plan) and hasattr(getattr(plan.module, "unet", None), "up_blocks"):
            blocks = list(plan.module.unet.up_blocks)[:2]
            if any(isinstance(b, (UpBlock2D, CrossAttnUpBlock2D)) for b in blocks):
                found = True
                plan = with_freeu_input(plan)
        out.append(plan)
    if not found:
        raise FreeUExportError(
            "--freeu: this pipeline's UNet has no UpBlock2D / CrossAttnUpBlock2D among its first two up blocks, "
            "where diffusers' enable_freeu acts (the latent upscaler's K-UNet ignores FreeU in diffusers too); "
            "export without --freeu")
    return out


class FreeUExportError(ValueError):
    pass
