"""ControlNet and T2I-Adapter export: their own component graphs, and a UNet graph that takes their
residuals where diffusers adds them.

A bundle with ControlNets holds, besides the residual-free ``unet`` (still used whenever no control
image is given, so plain generation costs what it did):

* ``unet_controlnet``: the same UNet with ``down_block_res_*`` / ``mid_block_res`` inputs
  (``down_block_additional_residuals`` / ``mid_block_additional_residual``). Its inputs depend on the
  UNet only, so every ControlNet made for that UNet fits it: adding one more ControlNet to a bundle
  (:func:`add_conditioning`) exports that ControlNet and nothing else;
* ``controlnet_0``, ``controlnet_1``, ...: each ControlNetModel at conditioning scale 1. Scales,
  guidance windows, guess mode's per-residual scales and multi-ControlNet sums are runtime
  arithmetic (:mod:`latentrt.runtime.pipelines.conditioning`).

A bundle with a T2I-Adapter holds ``adapter`` (image -> features, unscaled) and ``unet_adapter`` (the
UNet with ``adapter_feature_*`` inputs: ``down_intrablock_additional_residuals``, including the
in-place add after a DownBlock2D that also reaches its skip connection, as diffusers does it: the
wrapper calls diffusers' own ``UNet2DConditionModel.forward``).

``manifest.extra["control"]`` lists them in order, with what the runtime needs to know about each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .. import components as C
from .recipes import ComponentPlan, UnsupportedModelError
from .wrappers import SDXLUNetWrapper, UNetWrapper

CONTROLNET_UNET = "unet_controlnet"
ADAPTER_UNET = "unet_adapter"
ADAPTER = "adapter"


class _GatedCondProj(torch.nn.Module):
    """``cond_proj(timestep_cond) * gate``: gate 0 is diffusers' ``timestep_cond=None`` exactly."""

    def __init__(self, proj, gate):
        super().__init__()
        self.proj, self.gate = proj, gate

    def forward(self, condition):
        return self.proj(condition) * self.gate[:, None].to(condition.dtype)


class _ResidualInputs:
    """The residual inputs of the spec as the UNet's keyword arguments (a fresh list each call:
    diffusers pops the adapter features off it). An LCM UNet's graph also takes ``timestep_cond_gate``
    (B,): 1 uses ``timestep_cond``, 0 runs as diffusers does without it (what
    ``StableDiffusionControlNetImg2ImgPipeline`` does on an LCM UNet)."""

    def forward(self, *args):
        kw = dict(zip(self.input_names, args))
        if "timestep_cond_gate" not in kw:
            return super().forward(*args)
        emb = self.unet.time_embedding
        proj = emb.cond_proj
        emb.cond_proj = _GatedCondProj(proj, kw["timestep_cond_gate"])
        try:
            return super().forward(*args)
        finally:
            emb.cond_proj = proj

    def conditioning_kwargs(self, kw: dict) -> dict:
        down = [kw[n] for n in self.input_names if n.startswith("down_block_res_")]
        feats = [kw[n] for n in self.input_names if n.startswith("adapter_feature_")]
        out = {}
        if down:
            out.update(down_block_additional_residuals=down, mid_block_additional_residual=kw[C.MID_RESIDUAL])
        if feats:
            out["down_intrablock_additional_residuals"] = feats
        return out


class ResidualUNetWrapper(_ResidualInputs, UNetWrapper):
    """:class:`UNetWrapper` (explicit up-block sizes included) with ControlNet / adapter residual inputs."""


class ResidualSDXLUNetWrapper(_ResidualInputs, SDXLUNetWrapper):
    """:class:`SDXLUNetWrapper` with ControlNet / adapter residual inputs."""


class ControlNetWrapper(torch.nn.Module):
    """ControlNetModel at conditioning scale 1, not in guess mode -> down residuals..., mid residual."""

    def __init__(self, controlnet, input_names):
        super().__init__()
        self.controlnet = controlnet
        self.input_names = tuple(input_names)

    def forward(self, *args):
        kw = dict(zip(self.input_names, args))
        added = {k: kw[k] for k in ("text_embeds", "time_ids") if k in kw} or None
        down, mid = self.controlnet(kw["sample"], kw["timestep"], encoder_hidden_states=kw["encoder_hidden_states"],
                                    controlnet_cond=kw["controlnet_cond"], conditioning_scale=1.0, guess_mode=False,
                                    added_cond_kwargs=added, return_dict=False)
        return (*down, mid)


class AdapterWrapper(torch.nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, image):
        return tuple(self.adapter(image))


def _describe(src) -> str:
    """How the manifest names a source: a local folder's absolute path, a hub id, or the class of an
    in-memory model (which the torch backend cannot load again)."""
    if isinstance(src, (str, os.PathLike)):
        return str(Path(src).resolve()) if Path(src).is_dir() else str(src)
    return type(src).__name__


def manifest_control_plans(pipe, constants: dict, plans, control: dict) -> list[ComponentPlan]:
    """The conditioning plans of a bundle's ``extra["control"]``, from the sources it records (for the
    torch backend, which runs each component's own torch module)."""
    nets = [c["source"] for c in control.get("controlnets") or []]
    adapter = (control.get("adapter") or {}).get("source")
    return conditioning_plans(pipe, constants, plans, controlnets=nets, adapter=adapter, progress=lambda *_: None)[0]


def _load(cls_name: str, src, dtype, option: str, example: str):
    """A diffusers model of class ``cls_name``: given, or from a hub id / local folder."""
    import diffusers

    if isinstance(src, torch.nn.Module):
        return src.eval()
    if isinstance(src, (str, os.PathLike)) and str(src).startswith((".", "/")) and not Path(src).is_dir():
        raise FileNotFoundError(f"{option} {src}: no such folder (pass a diffusers {cls_name} folder or a hub id such "
                                f"as {example})")
    return getattr(diffusers, cls_name).from_pretrained(str(src), dtype=dtype).eval()


def load_controlnet(src, dtype=torch.float32):
    return _load("ControlNetModel", src, dtype, "--controlnet", "lllyasviel/sd-controlnet-canny")


def load_adapter(src, dtype=torch.float32):
    return _load("T2IAdapter", src, dtype, "--adapter", "TencentARC/t2iadapter_canny_sd15v2")


def unet_residual_shapes(unet_config, vae_scale_factor: int):
    """(channels, downsampling) of the UNet's down-block skips and its mid block."""
    return C.unet_down_residual_shapes(block_out_channels=unet_config.block_out_channels,
                                       layers_per_block=unet_config.layers_per_block,
                                       vae_scale_factor=vae_scale_factor)


def unet_intrablock_shapes(unet_config, vae_scale_factor: int) -> list[tuple[int, int]]:
    """Where ``down_intrablock_additional_residuals`` go, in order: a cross-attention down block adds
    one after its last resnet (before downsampling), a DownBlock2D after the whole block (after its
    downsampler); one more is added to the mid block's input when its shape matches."""
    f, out = int(vae_scale_factor), []
    blocks = list(unet_config.block_out_channels)
    for i, (kind, c) in enumerate(zip(unet_config.down_block_types, blocks)):
        last = i == len(blocks) - 1
        if "CrossAttn" in kind:
            out.append((int(c), f))
        else:
            out.append((int(c), f if last else 2 * f))
        f = f if last else 2 * f
    return out + [(int(blocks[-1]), f)]


def check_controlnet_fits(controlnet, unet, vae_scale_factor: int, what: str) -> None:
    cn, un = controlnet.config, unet.config
    mine, theirs = unet_residual_shapes(cn, vae_scale_factor), unet_residual_shapes(un, vae_scale_factor)
    problems = []
    if mine != theirs:
        problems.append(f"its residuals {mine[0]} (channels, downsampling) do not match the UNet's {theirs[0]}")
    if int(cn.cross_attention_dim) != int(un.cross_attention_dim):
        problems.append(f"cross_attention_dim {cn.cross_attention_dim} != the UNet's {un.cross_attention_dim}")
    if getattr(cn, "addition_embed_type", None) != getattr(un, "addition_embed_type", None):
        problems.append(f"addition_embed_type {getattr(cn, 'addition_embed_type', None)!r} != the UNet's "
                        f"{getattr(un, 'addition_embed_type', None)!r} (an SD ControlNet on SDXL or the reverse?)")
    if problems:
        raise UnsupportedModelError(f"ControlNet {what} does not fit this pipeline's UNet: {'; '.join(problems)}")


def adapter_feature_shapes(adapter) -> list[tuple[int, int]]:
    """(channels, downsampling) of each adapter feature, from one small forward pass."""
    side = int(adapter.total_downscale_factor) * 4
    x = torch.zeros(1, int(adapter.config.in_channels), side, side, dtype=next(adapter.parameters()).dtype)
    with torch.inference_mode():
        feats = adapter(x)
    return [(int(t.shape[1]), side // int(t.shape[2])) for t in feats]


def _base_unet_plan(plans) -> ComponentPlan:
    for p in plans:
        if p.spec.name == "unet":
            return p
    raise UnsupportedModelError("ControlNets and adapters need a pipeline with a UNet")


def residual_unet_plan(base: ComponentPlan, residuals, name: str) -> ComponentPlan:
    if any(s.name == "timestep_cond" for s in base.spec.inputs):
        residuals = (*residuals, C.TensorSpec("timestep_cond_gate", "float32", ("B",)))
    spec = C.with_residual_inputs(base.spec, residuals, name)
    cls = ResidualSDXLUNetWrapper if isinstance(base.module, SDXLUNetWrapper) else ResidualUNetWrapper
    ranges = {**base.value_ranges, "timestep_cond_gate": (0, 1)}
    return ComponentPlan(spec, cls(base.module.unet, [s.name for s in spec.inputs]), ranges)


def controlnet_plan(controlnet, unet_spec: C.ComponentSpec, unet_config, constants: dict, index: int,
                    what: str) -> tuple[ComponentPlan, dict]:
    f = int(constants["vae_scale_factor"])
    down, mid = unet_residual_shapes(unet_config, f)
    spec = C.controlnet_spec(unet_spec, cond_channels=int(controlnet.config.conditioning_channels),
                             down_shapes=down, mid_shape=mid, name=f"controlnet_{index}")
    plan = ComponentPlan(spec, ControlNetWrapper(controlnet, [s.name for s in spec.inputs]),
                         {"timestep": (0, 999), "time_ids": (0, 1024), "controlnet_cond": (0, 1)})
    info = {"component": spec.name, "source": what,
            "conditioning_channels": int(controlnet.config.conditioning_channels),
            "global_pool_conditions": bool(getattr(controlnet.config, "global_pool_conditions", False))}
    return plan, info


def controlnet_residuals(unet_config, constants: dict):
    down, mid = unet_residual_shapes(unet_config, int(constants["vae_scale_factor"]))
    return C.residual_specs(C.down_residual_names(len(down)), down) + C.residual_specs([C.MID_RESIDUAL], [mid])


def conditioning_plans(pipe, constants: dict, plans, *, controlnets=(), adapter=None, first_index: int = 0,
                       with_unet: bool = True, progress: Callable[[str], None] = print,
                       dtype=torch.float32) -> tuple[list[ComponentPlan], dict]:
    """Plans for the ControlNets (``controlnet_{first_index}``...), the adapter and, with ``with_unet``,
    the residual UNet each needs; and the manifest's ``extra["control"]`` entries for them."""
    if controlnets and adapter is not None:
        raise ValueError("a bundle takes ControlNets or a T2I-Adapter, not both (diffusers has no pipeline that "
                         "combines them)")
    base = _base_unet_plan(plans)
    unet = base.module.unet
    f = int(constants["vae_scale_factor"])
    out, extra = [], {}
    if controlnets:
        if with_unet:
            out.append(residual_unet_plan(base, controlnet_residuals(unet.config, constants), CONTROLNET_UNET))
        extra["controlnet_unet"] = CONTROLNET_UNET
        extra["controlnets"] = []
        for k, src in enumerate(controlnets):
            what = _describe(src)
            progress(f"loading ControlNet {what}")
            cn = load_controlnet(src, dtype)
            check_controlnet_fits(cn, unet, f, what)
            plan, info = controlnet_plan(cn, base.spec, unet.config, constants, first_index + k, what)
            out.append(plan)
            extra["controlnets"].append(info)
    if adapter is not None:
        what = _describe(adapter)
        progress(f"loading T2I-Adapter {what}")
        ad = load_adapter(adapter, dtype)
        shapes = adapter_feature_shapes(ad)
        wanted = unet_intrablock_shapes(unet.config, f)
        n_blocks = len(wanted) - 1
        used = min(len(shapes), n_blocks)
        if len(shapes) > n_blocks and shapes[n_blocks] == wanted[-1]:
            used += 1  # the mid block's, added only when the shapes match
        if shapes[:min(len(shapes), n_blocks)] != wanted[:min(len(shapes), n_blocks)]:
            raise UnsupportedModelError(
                f"T2I-Adapter {what} does not fit this pipeline's UNet: its features (channels, downsampling) are "
                f"{shapes}, the UNet adds them at {wanted[:-1]} (+ {wanted[-1]} at the mid block)")
        spec = C.adapter_spec(in_channels=int(ad.config.in_channels), feature_shapes=shapes, name=ADAPTER)
        out.append(ComponentPlan(spec, AdapterWrapper(ad), {"image": (0, 1)}))
        # features beyond the UNet's places are never added (diffusers drops them too): not inputs
        feats = C.residual_specs(C.adapter_feature_names(used), shapes[:used])
        if with_unet:
            out.append(residual_unet_plan(base, feats, ADAPTER_UNET))
        extra["adapter"] = {"component": ADAPTER, "unet": ADAPTER_UNET, "source": what,
                            "in_channels": int(ad.config.in_channels), "features_used": used,
                            "downscale_factor": int(ad.total_downscale_factor)}
    return out, extra
