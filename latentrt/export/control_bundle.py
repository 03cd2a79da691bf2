"""Add ControlNets to an existing bundle without re-exporting its UNet.

The residual UNet graph (``unet_controlnet``) depends on the UNet only, so once a bundle has it,
a further ControlNet is one more ``controlnet_N`` component. New components are written to
temporary folders inside the bundle and renamed into place; the manifest, rewritten atomically
last, is what makes them part of the bundle (a failure before leaves the bundle as it was).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..components import ComponentSpec
from ..manifest import read_manifest
from .control import CONTROLNET_UNET, controlnet_plan, load_controlnet
from .precision import parse_component_precisions


def add_conditioning(bundle, controlnets, *, src=None, check: str = "quick", progress: Callable[[str], None] = print):
    """Append ``controlnets`` (hub ids, folders or ControlNetModels) to ``bundle``'s ControlNets.

    A bundle without ControlNets yet lacks the residual UNet graph: ``src`` (the pipeline it was
    exported from: hub id, folder or a loaded pipeline) then gives the UNet to export it from, once;
    the bundle's own ``unet`` stays as it is."""
    import torch

    root = Path(bundle)
    manifest = read_manifest(root)
    control = dict(manifest.extra.get("control") or {})
    if "adapter" in control:
        raise ValueError(f"{root}: this bundle has a T2I-Adapter; a bundle takes ControlNets or an adapter, not both")
    k = manifest.constants
    plans = []
    if CONTROLNET_UNET not in manifest.components:
        if manifest.extra.get("loras"):  # SRC has no LoRAs: its residual UNet would lose them (fused or adapters)
            raise ValueError(f"{root}: this bundle has LoRAs, which the {CONTROLNET_UNET} graph exported from SRC would "
                             "lack; export the bundle again with its --lora options and --controlnet together")
        if src is None:
            raise ValueError(f"{root}: this bundle has no ControlNet yet, so no {CONTROLNET_UNET} graph (the UNet "
                             "with residual inputs); pass the pipeline it was exported from as SRC (`latentrt export "
                             "SRC --add-to BUNDLE --controlnet CN`) to export that graph once")
        plans.append((_residual_unet_from(src, manifest, progress), None))
        ip = manifest.extra.get("ip_adapter")
        if ip:  # an IP-Adapter bundle: the residual graph's IP twin too (latentrt.export.ip_adapter)
            from .ip_adapter import residual_twin_plan

            plans.append((residual_twin_plan(src, manifest, plans[0][0], ip), None))
    unet_entry = manifest.components["unet"]
    unet_spec = ComponentSpec("unet", *[tuple(s.with_dtype("float32") if s.dtype == "float16" else s for s in specs)
                                        for specs in (unet_entry.spec.inputs, unet_entry.spec.outputs)])
    residual_unet = plans[0][0].spec if plans else manifest.components[CONTROLNET_UNET].spec
    residuals = [s for s in residual_unet.inputs if s.name.startswith(("down_", "mid_"))]
    nets = list(control.get("controlnets") or [])
    for j, cn_src in enumerate(controlnets):
        progress(f"loading ControlNet {cn_src}")
        cn = load_controlnet(cn_src, torch.float32)
        # the ControlNet's own down blocks give its residuals; they must be the bundle UNet's
        plan, info = controlnet_plan(cn, unet_spec, cn.config, k, len(nets) + j, str(cn_src))
        mine, theirs = [s.shape[1:] for s in plan.spec.outputs], [s.shape[1:] for s in residuals]
        sdxl_net = getattr(cn.config, "addition_embed_type", None) == "text_time"
        if sdxl_net != (manifest.pipeline == "sdxl"):
            raise ValueError(f"ControlNet {cn_src} is {'an SDXL' if sdxl_net else 'an SD'} ControlNet; this bundle is "
                             f"{manifest.pipeline!r}")
        if mine != theirs or int(cn.config.cross_attention_dim) != int(k["cross_attention_dim"]):
            raise ValueError(f"ControlNet {cn_src} does not fit this bundle's UNet: its residuals (channels, H, W) are "
                             f"{mine}, cross_attention_dim {cn.config.cross_attention_dim}; the UNet takes {theirs}, "
                             f"{k['cross_attention_dim']}")
        plans.append((plan, info))
    from .bundle import export_plans

    h, w = (manifest.extra.get("export") or {}).get("trace_size") or [k["default_height"], k["default_width"]]
    sizes = {"B": 1, "H": int(h), "W": int(w)}
    staging = Path(tempfile.mkdtemp(prefix=".add-", dir=root))
    try:
        entries = export_plans([p for p, _ in plans], staging, precision=manifest.precision,
                               overrides=parse_component_precisions(manifest.precision, None), check=check,
                               export_sizes=sizes, check_sizes=[sizes], progress=progress)
        for name, entry in entries.items():
            target = root / name
            if target.exists():  # a leftover of an interrupted add: not in the manifest
                shutil.rmtree(target)
            (staging / name).rename(target)
            manifest.components[name] = entry
        control["controlnets"] = nets + [info for _, info in plans if info is not None]
        if manifest.extra.get("ip_adapter") and CONTROLNET_UNET + "_ip_adapter" in entries:
            manifest.extra["ip_adapter"]["twins"][CONTROLNET_UNET] = CONTROLNET_UNET + "_ip_adapter"
        control["controlnet_unet"] = CONTROLNET_UNET
        manifest.extra["control"] = control
        manifest.write(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"added {len(controlnets)} ControlNet(s) to {root}")
    return manifest


def _residual_unet_from(src, manifest, progress):
    """The residual UNet plan of the pipeline at ``src`` (checked to be the bundle's kind)."""
    from .bundle import load_pipeline
    from .control import controlnet_residuals, residual_unet_plan
    from .recipes import detect_kind

    pipe = src if hasattr(src, "unet") else load_pipeline(src)[0]
    recipe = detect_kind(pipe)
    if recipe.kind != manifest.pipeline:
        raise ValueError(f"SRC is a {recipe.kind!r} pipeline but the bundle is {manifest.pipeline!r}; pass the "
                         "pipeline the bundle was exported from")
    constants = recipe.constants(pipe)
    base = next(p for p in recipe.components(pipe, constants) if p.spec.name == "unet")
    progress(f"exporting the residual UNet graph from {src if isinstance(src, str) else type(src).__name__}")
    return residual_unet_plan(base, controlnet_residuals(pipe.unet.config, constants), CONTROLNET_UNET)
