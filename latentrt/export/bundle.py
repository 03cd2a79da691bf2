"""``latentrt export``: a diffusers pipeline (hub id or local folder) -> a self-describing bundle.

The bundle is written into a temporary folder beside the destination and renamed into place at
the end, so an interrupted or failed export leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import __version__
from ..manifest import Manifest, write_json_atomic
from ..sizes import bundle_size_limits
from .memory_facts import memory_facts
from .onnx_export import ExportOptions, export_component
from .precision import parse_component_precisions
from .recipes import detect_kind, vae_tile_constants
from .single_file import is_single_file, load_single_file
from .scheduler_files import write_scheduler_configs


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"latentrt": __version__}
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxconverter-common", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


#: bundle components whose torch module is a differently named pipeline attribute
COMPONENT_ATTRIBUTES = {"vae_decoder": "vae", "vae_encoder": "vae"}

#: ``check`` values of :func:`export_bundle`: sizes checked against torch
CHECKS = ("full", "quick", "off")


def load_dtypes(precision: str, overrides: dict[str, str]):
    """The ``dtype`` to load a pipeline with so that each component is already in its export
    precision (a low-memory export): e.g. fp16 with ``vae_decoder`` in fp32 gives
    ``{"default": float16, "vae": float32}``."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    out = {"default": dtypes[precision]}
    for attr in {COMPONENT_ATTRIBUTES.get(name, name) for name in overrides}:
        # every component exported from this module; one of them in fp32 (say the VAE decoder while
        # the encoder is fp16, or the other way round) loads the module in fp32
        users = [c for c, a in COMPONENT_ATTRIBUTES.items() if a == attr] or [attr]
        out[attr] = dtypes["fp32" if "fp32" in {overrides.get(c, precision) for c in users} else "fp16"]
    return out


def load_pipeline(src: str | os.PathLike, *, revision: str | None = None, variant: str | None = None,
                  dtype=None):
    """Load a diffusers pipeline from a local folder (as written by ``save_pretrained``) or a hub id,
    in float32 unless ``dtype`` says otherwise (a torch dtype, or diffusers' per-component dict)."""
    import torch
    from diffusers import DiffusionPipeline

    src = str(src)
    local = Path(src).is_dir()
    if not local and (src.startswith((".", "/")) or os.sep in src.strip("/").replace("/", "", 1)):
        raise FileNotFoundError(f"{src}: no such folder (and not a hub id of the form owner/name)")
    kwargs: dict[str, Any] = {"dtype": torch.float32 if dtype is None else dtype}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    try:
        pipe = DiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False, **kwargs)
    except TypeError:
        pipe = DiffusionPipeline.from_pretrained(src, **kwargs)
    source = {"id": None if local else src, "path": str(Path(src).resolve()) if local else None,
              "revision": revision, "pipeline_class": type(pipe).__name__}
    return pipe, source


@contextmanager
def atomic_bundle_dir(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary folder that becomes ``out`` only if the block completes."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _make_readable(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(root: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the bundle the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_support_files(pipe, root: Path, kind: str, src=None, revision: str | None = None) -> dict[str, str]:
    """Tokenizer, scheduler configs (as the source published them: see
    :mod:`latentrt.export.scheduler_files`) and a diffusers-style model_index.json. Returns how each
    scheduler config was obtained."""
    pipe.tokenizer.save_pretrained(str(root / "tokenizer"))
    how = write_scheduler_configs(pipe, root, src, revision)
    index = {"_class_name": type(pipe).__name__, "_latentrt_pipeline": kind,
             "scheduler": ["diffusers", type(pipe.scheduler).__name__], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if getattr(pipe, "tokenizer_2", None) is not None:  # SDXL's second tokenizer
        pipe.tokenizer_2.save_pretrained(str(root / "tokenizer_2"))
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    write_json_atomic(root / "model_index.json", index)
    return how


def export_plans(plans, root: Path, *, precision: str, overrides: dict, check: str, export_sizes: dict,
                 check_sizes: list, progress: Callable[[str], None], folder=lambda name: name) -> dict:
    """Export each plan's component into ``root / folder(name)``; the manifest entries by name."""
    entries = {}
    for plan in plans:
        name = plan.spec.name
        prec = overrides.get(name, precision)
        progress(f"exporting {name} ({prec})")
        opts = ExportOptions(precision=prec, value_ranges=plan.value_ranges, progress=progress, check=check != "off")
        entry = export_component(plan.module, plan.spec, root / folder(name), export_sizes=export_sizes,
                                 check_sizes=check_sizes, options=opts, bundle_root=root)
        facts = memory_facts(plan.module, plan.spec)  # for the runtime's memory estimate (runtime/limits.py)
        if facts:
            entry.extra["memory"] = facts
        p = entry.parity
        if "max_abs" in p:
            progress(f"  {name}: max abs error vs torch {p['max_abs']:.2e} (relative {p['max_rel']:.2e}, "
                     f"tolerance {p['tolerance']}) in {p['export_seconds']:.1f}s")
        else:
            progress(f"  {name}: exported in {p['export_seconds']:.1f}s (not checked against torch)")
        entries[name] = entry
    return entries


def export_bundle(
    src,
    out,
    *,
    precision: str = "fp32",
    overwrite: bool = False,
    revision: str | None = None,
    pipe=None,
    progress: Callable[[str], None] = print,
    component_precision: dict[str, str] | None = None,
    check: bool | str = True,
    tiny_vae=None,
    loras=None,
    vae=None,
    low_memory: bool = False,
    trace_size: int | None = None,
    textual_inversions=None,
    allow_pickle: bool = False,
    config: str | None = None,
    profile=None,
    max_size: int | None = None,
    max_batch: int | None = None,
    controlnets=None,
    adapter=None,
    ip_adapter=None,
    image_encoder=None,
    safety_checker: bool | None = None,
    freeu: bool = False,
    lora_mode: str = "fused",
) -> Manifest:
    """Export every component of the pipeline at ``src`` into the bundle folder ``out``.

    ``pipe`` may be given (an already-loaded diffusers pipeline) to skip loading ``src``.
    ``loras``: LoRAs fused into the UNet and text encoder before tracing, each ``"SRC[:WEIGHT]"``, a
    path or ``(source, weight)`` (see :mod:`latentrt.export.lora`); a given ``pipe`` is copied, not changed.
    ``lora_mode="adapter"`` keeps them unfused, each a branch scaled per call by the graphs' ``lora_scales``
    input (``"SRC[:WEIGHT[:NAME]]"``; see :mod:`latentrt.export.lora_adapter`).
    ``vae`` (hub id, local folder or ``AutoencoderKL``) replaces the pipeline's VAE, e.g. the fp16-safe
    ``madebyollin/sdxl-vae-fp16-fix`` for all-fp16 SDXL bundles (see :mod:`latentrt.export.vae_swap`).
    ``textual_inversions``: embedding files, each ``"FILE[:TOKEN]"``, whose tokens are added to the
    tokenizer(s) and text encoder(s) (see :mod:`latentrt.export.textual_inversion`; pickled ``.pt`` files
    only with ``allow_pickle``).
    ``src`` may be a single-file checkpoint (``.safetensors``; ``.ckpt`` only with ``allow_pickle``), loaded
    with diffusers' ``from_single_file`` and ``config`` (a diffusers folder or hub id; see
    :mod:`latentrt.export.single_file`).
    ``tiny_vae`` (hub id, local folder or ``AutoencoderTiny``) adds TAESD as ``tiny_vae_decoder`` /
    ``tiny_vae_encoder`` (see :mod:`latentrt.export.tiny_vae`).

    ``check``: ``"full"`` (or True) checks every component against torch at two sizes, ``"quick"``
    (or False) at one, ``"off"`` not at all (the manifest says so). ``trace_size``: the height and
    width components are traced and checked at (default: the pipeline's default size; graphs keep
    dynamic sizes either way, and a small one makes a 1024-pixel SDXL export much cheaper).

    ``low_memory``: load each component in the precision it is exported in (``precision="fp16"``
    loads fp16 weights, components kept in fp32 load fp32) instead of fp32 plus an fp16 copy, and
    check fp16 graphs against the fp16 module. An fp16 SDXL export then peaks near the size of the
    fp16 model plus one fp16 UNet graph instead of the fp32 model plus two fp16 copies (which does
    not fit in 24 GiB). LoRAs are then fused in the loaded precision, as a diffusers fp16 pipeline does.

    Sizes (:func:`latentrt.sizes.bundle_size_limits`): the manifest records the range of sides
    (``min_size``, ``max_size``) and the most images per call (``max_batch``) the bundle serves, from
    the default or trace size, then ``profile``'s (a :class:`~latentrt.profiles.Profile` or its name)
    ``H`` / ``W`` / ``B`` ranges, then ``max_size`` / ``max_batch``; the runtime refuses calls outside it.
    ``controlnets`` (hub ids, local folders or ``ControlNetModel`` s, in order) and ``adapter`` (a
    ``T2IAdapter`` likewise) add conditioning components and the UNet graph that takes their residuals
    (see :mod:`latentrt.export.control`); :func:`latentrt.export.control_bundle.add_conditioning` adds
    them to an existing bundle.
    ``ip_adapter`` (a weight file, a folder with one, or ``owner/name/[subfolder/]file`` on the hub, as
    diffusers' ``load_ip_adapter`` takes it) adds the image encoder (``image_encoder``: a
    CLIPVisionModelWithProjection folder or hub id, default the one beside the weights), the image
    projection and UNet graphs with image-prompt inputs (see :mod:`latentrt.export.ip_adapter`).
    ``safety_checker``: export diffusers' safety checker (True: required; False: never; None, the default:
    when the source carries one, as diffusers loads it; see :mod:`latentrt.export.safety`).
    ``freeu``: the UNet graphs take a ``freeu`` input, (s1, s2, b1, b2) per call (see :mod:`latentrt.export.freeu`).
    """
    overrides = parse_component_precisions(precision, component_precision)
    check = {True: "full", False: "quick"}.get(check, check) if isinstance(check, bool) else check
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS} (or True/False); got {check!r}")
    if trace_size is not None and (not isinstance(trace_size, int) or trace_size < 8):
        raise ValueError(f"trace_size must be an image size in pixels (e.g. 256); got {trace_size!r}")
    t0 = time.perf_counter()
    pipe_given = pipe is not None
    if pipe is None and is_single_file(src):  # one original-layout checkpoint (latentrt.export.single_file)
        progress(f"loading the single-file checkpoint {src}")
        pipe, source = load_single_file(src, config=config, allow_pickle=allow_pickle)
    elif pipe is None:
        progress(f"loading {src}" + (" (each component in its export precision)" if low_memory else ""))
        pipe, source = load_pipeline(src, revision=revision,
                                     dtype=load_dtypes(precision, overrides) if low_memory else None)
    else:
        source = {"id": None, "path": str(src) if src else None, "revision": revision,
                  "pipeline_class": type(pipe).__name__}
    lora_records = []
    lora_adapters = None  # --lora-mode adapter (latentrt.export.lora_adapter)
    if lora_mode not in ("fused", "adapter"):
        raise ValueError(f"lora_mode must be 'fused' or 'adapter'; got {lora_mode!r}")
    if lora_mode == "adapter" and not loras:
        raise ValueError("lora_mode='adapter' (--lora-mode adapter) needs at least one LoRA (--lora SRC[:WEIGHT[:NAME]])")
    if loras:
        import copy

        from .lora import fuse_loras

        loras = list(loras)
        progress(f"{'fusing' if lora_mode == 'fused' else 'loading as adapters'} {len(loras)} LoRA(s)")
        if pipe_given:
            pipe = copy.deepcopy(pipe)
        if lora_mode == "adapter":
            from .lora_adapter import load_lora_adapters

            lora_adapters = load_lora_adapters(pipe, loras, kind=detect_kind(pipe).kind)
            lora_records = lora_adapters.records
        else:
            lora_records = fuse_loras(pipe, loras)
    ti_records = []
    if textual_inversions:  # new tokens and text-encoder rows (latentrt.export.textual_inversion)
        import copy

        from .textual_inversion import add_textual_inversions

        if pipe_given and not loras:
            pipe = copy.deepcopy(pipe)
        progress(f"adding {len(textual_inversions)} textual-inversion embedding(s)")
        ti_records = add_textual_inversions(pipe, textual_inversions, allow_pickle=allow_pickle)
    vae_source = None
    if vae is not None:  # e.g. madebyollin/sdxl-vae-fp16-fix (see latentrt.export.vae_swap)
        from .vae_swap import swap_vae

        progress(f"using the VAE {vae if isinstance(vae, (str, os.PathLike)) else type(vae).__name__}")
        pipe, vae_source = swap_vae(pipe, vae, copy_pipe=pipe_given and not loras and not ti_records)
    recipe = detect_kind(pipe)
    constants = recipe.constants(pipe)
    constants.update(vae_tile_constants(getattr(pipe, "vae", None)))  # VAE tiling (issue 17)
    plans = recipe.components(pipe, constants)
    tiny_source = None
    if tiny_vae is not None:
        from .tiny_vae import load_tiny_vae, tiny_vae_plans

        progress(f"loading tiny VAE {tiny_vae if isinstance(tiny_vae, (str, os.PathLike)) else type(tiny_vae).__name__}")
        tiny_model, tiny_source = load_tiny_vae(tiny_vae, revision=None)
        tiny_plans, tiny_constants = tiny_vae_plans(tiny_model, constants)
        plans = [*plans, *tiny_plans]
        constants = {**constants, **tiny_constants}
    control_extra = None
    if controlnets or adapter is not None:
        import torch

        from .control import conditioning_plans

        control_plans, control_extra = conditioning_plans(
            pipe, constants, plans, controlnets=list(controlnets or ()), adapter=adapter, progress=progress,
            dtype=load_dtypes(precision, overrides)["default"] if low_memory else torch.float32)
        plans = [*plans, *control_plans]
    ip_extra = None
    if ip_adapter is not None:  # IP-Adapter image prompts (latentrt.export.ip_adapter)
        from .ip_adapter import ip_adapter_plans

        ip_plans, ip_extra = ip_adapter_plans(pipe, constants, plans, ip_adapter, image_encoder=image_encoder,
                                              allow_pickle=allow_pickle, kind=recipe.kind, progress=progress)
        plans = [*plans, *ip_plans]
    elif image_encoder is not None:
        raise ValueError("image_encoder (--image-encoder) is for an IP-Adapter; pass ip_adapter (--ip-adapter) too")
    from .safety import prepare_safety_checker  # issue 20: the safety checker (export/safety.py)

    safety = prepare_safety_checker(pipe, None if pipe_given else src, recipe.kind, safety_checker, revision=revision,
                                    progress=progress)  # a given pipeline: its own checker decides
    if safety is not None:
        plans = [*plans, safety.plan]
    if freeu:  # FreeU factors as a UNet graph input (issue 17; latentrt.export.freeu)
        from .freeu import add_freeu_inputs

        plans = add_freeu_inputs(plans)
    if lora_adapters is not None:  # every graph with LoRA branches takes lora_scales (all UNet graphs, text encoders)
        plans = lora_adapters.add_inputs(plans)

    if isinstance(profile, str):
        from ..profiles import load_profile

        profile = load_profile(profile)
    constants.update(bundle_size_limits(constants, trace_size=trace_size, profile=profile, max_size=max_size,
                                        max_batch=max_batch))
    dh, dw, m = constants["default_height"], constants["default_width"], constants["size_multiple"]
    if trace_size is not None:
        if trace_size % m or not constants["min_size"] <= trace_size <= constants["max_size"]:
            raise ValueError(f"trace_size must be a multiple of {m} from {constants['min_size']} to "
                             f"{constants['max_size']} for this pipeline; got {trace_size}")
        dh = dw = trace_size
    export_sizes = {"B": 1, "H": dh, "W": dw}
    check_sizes = [export_sizes, {"B": 2, "H": dh, "W": dw + m}] if check == "full" else [export_sizes]

    with atomic_bundle_dir(Path(out), overwrite=overwrite) as root:
        entries = export_plans(plans, root, precision=precision, overrides=overrides, check=check,
                               export_sizes=export_sizes, check_sizes=check_sizes, progress=progress)
        scheduler_configs = write_support_files(pipe, root, recipe.kind, src, revision)
        recipe_extra = recipe.support_files(pipe, root) if recipe.support_files is not None else None
        manifest = Manifest(pipeline=recipe.kind, components=entries, constants=constants, source=source,
                            precision=precision, tools=tool_versions())
        manifest.extra["export_seconds"] = round(time.perf_counter() - t0, 2)
        manifest.extra["scheduler_configs"] = scheduler_configs  # runtime: the files hold their own keys only
        manifest.extra["export"] = {"check": check, "trace_size": [dh, dw], "low_memory": bool(low_memory)}
        if lora_records:
            manifest.extra["loras"] = lora_records
        if lora_adapters is not None:
            manifest.extra["lora_adapter"] = lora_adapters.manifest_extra()
        if ti_records:
            manifest.extra["textual_inversion"] = ti_records
        if recipe_extra:
            manifest.extra.update(recipe_extra)
        if tiny_source is not None:
            manifest.extra["tiny_vae"] = tiny_source
        if vae_source is not None:
            manifest.extra["vae"] = vae_source
        if control_extra:
            manifest.extra["control"] = control_extra
        if ip_extra:
            manifest.extra["ip_adapter"] = ip_extra
        if safety is not None:
            manifest.extra["safety_checker"] = safety.write(root)
        if freeu:
            manifest.extra["freeu"] = {"input": "freeu", "order": ["s1", "s2", "b1", "b2"]}
        manifest.write(root)
    progress(f"wrote {out} ({manifest.extra['export_seconds']:.1f}s)")
    return manifest


