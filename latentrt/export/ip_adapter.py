"""IP-Adapter export: the CLIP image encoder, the image projection and a UNet graph with image-prompt inputs.

diffusers' ``pipe.load_ip_adapter`` loads the adapter into the UNet: its image projection layer
(``unet.encoder_hid_proj``) turns the image encoder's output into ``T`` extra tokens, and every
cross-attention layer gets an ``IPAdapterAttnProcessor2_0`` that attends to those tokens with its own
``to_k_ip`` / ``to_v_ip`` and adds ``scale * result`` to the text attention. A bundle exported with an
IP-Adapter holds, besides its unchanged ``unet`` (what calls without an image prompt run):

* ``image_encoder``: the ``CLIPVisionModelWithProjection``: ``pixel_values`` -> ``image_embeds`` (plain
  IP-Adapters) or ``penultimate_hidden_states`` (``hidden_states[-2]``: "plus" and "full" variants),
  what diffusers' ``encode_image`` feeds the projection;
* ``image_projection``: that output -> ``ip_tokens`` (B, T, cross_attention_dim). It is its own graph,
  not part of the UNet's: its result is the same at every step, so the runtime computes it once per
  call instead of once per step (in diffusers it runs inside every UNet call, on the doubled batch);
* ``unet_ip_adapter``: the UNet with two more inputs, ``ip_tokens`` and ``ip_adapter_scale`` (B,), the
  scale every IP attention layer multiplies its result by, so the scale is per call. diffusers skips
  the IP branch at scale 0; the graph always computes it and multiplies by 0, which is the same sum;
* for a bundle with ControlNets or a T2I-Adapter, a twin of each residual UNet graph with the same two
  inputs (``unet_controlnet_ip_adapter``, ``unet_adapter_ip_adapter``), so both condition one call.

The wrappers run diffusers' own UNet forward and attention processors: the projection is swapped for a
pass-through of ``ip_tokens`` and each processor's Python-float scale for the ``ip_adapter_scale`` input.
The IP-Adapter is loaded into a copy of the UNet: the bundle's plain ``unet`` graph stays as it was.
``manifest.extra["ip_adapter"]`` records the graphs, the source and the CLIP image preprocessing.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import torch

from ..components import ComponentSpec
from ..spec import TensorSpec
from .recipes import ComponentPlan, UnsupportedModelError

IP_UNET = "unet_ip_adapter"
IMAGE_ENCODER = "image_encoder"
PROJECTION = "image_projection"
IP_SUFFIX = "_ip_adapter"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class IPAdapterSourceError(ValueError):
    """An ``--ip-adapter`` / ``--image-encoder`` source that cannot be used."""


# -- the source -------------------------------------------------------------------------------------


def resolve_source(source) -> tuple[str, str, str]:
    """``(pretrained_model_name_or_path, subfolder, weight_name)`` for ``load_ip_adapter`` from a local
    weight file, a local folder holding one weight file, or a hub path ``owner/name/[subfolder/]file``."""
    text = str(source)
    p = Path(text)
    if p.is_file():
        if not p.name.endswith(WEIGHT_SUFFIXES):
            raise IPAdapterSourceError(f"--ip-adapter {text}: not an IP-Adapter weight file (.safetensors or .bin)")
        return str(p.resolve().parent), "", p.name
    if p.is_dir():
        files = sorted(f.name for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
        if len(files) != 1:
            raise IPAdapterSourceError(
                f"--ip-adapter {text}: the folder holds {len(files)} weight files ({', '.join(files) or 'none'}); pass "
                "the file itself, e.g. --ip-adapter FOLDER/ip-adapter_sd15.safetensors")
        return str(p.resolve()), "", files[0]
    if text.startswith((".", "/", "~")) or os.path.isabs(text):
        raise IPAdapterSourceError(f"--ip-adapter {text}: no such file or folder")
    parts = text.strip("/").split("/")
    if len(parts) < 3 or not parts[-1].endswith(WEIGHT_SUFFIXES):
        raise IPAdapterSourceError(
            f"--ip-adapter {text}: a hub source names the weight file, owner/name/[subfolder/]file.safetensors, e.g. "
            "h94/IP-Adapter/models/ip-adapter_sd15.safetensors (or pass a local file)")
    return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]


def _load_image_encoder(src):
    from transformers import CLIPVisionModelWithProjection

    if isinstance(src, torch.nn.Module):
        return src.eval()
    text = str(src)
    if Path(text).is_dir():
        return CLIPVisionModelWithProjection.from_pretrained(text, dtype=torch.float32).eval()
    if text.startswith((".", "/", "~")):
        raise IPAdapterSourceError(f"--image-encoder {src}: no such folder (a CLIPVisionModelWithProjection folder, "
                                   "or a hub id with its subfolder, e.g. h94/IP-Adapter/models/image_encoder)")
    parts = text.strip("/").split("/")  # owner/name[/subfolder...]
    return CLIPVisionModelWithProjection.from_pretrained("/".join(parts[:2]), subfolder="/".join(parts[2:]),
                                                         dtype=torch.float32).eval()


def load_ip_adapter(pipe, source, image_encoder=None, *, allow_pickle: bool = False):
    """A pipeline of ``pipe``'s class sharing its modules except the UNet (a copy), with the IP-Adapter
    loaded by diffusers' ``load_ip_adapter`` (its image encoder and feature extractor included). A ``.bin``
    weight file is a pickle: refused unless ``allow_pickle`` (diffusers then reads it with
    ``torch.load(weights_only=True)``)."""
    if not hasattr(pipe, "load_ip_adapter"):
        raise UnsupportedModelError(f"{type(pipe).__name__} takes no IP-Adapter in diffusers")
    root, subfolder, weight = resolve_source(source)
    if weight.endswith(".bin") and not allow_pickle:
        raise IPAdapterSourceError(f"--ip-adapter {source}: .bin files are Python pickles, which can run code when "
                                   "loaded; pass --allow-pickle for a file you trust, or use the .safetensors file")
    parts = dict(pipe.components)
    parts["unet"] = copy.deepcopy(pipe.unet)
    if image_encoder is not None:
        parts["image_encoder"] = _load_image_encoder(image_encoder)
    elif getattr(pipe, "image_encoder", None) is None:
        parts["image_encoder"] = None
        enc_dir = Path(root, subfolder, "image_encoder")
        if Path(root).is_dir() and not enc_dir.is_dir():
            raise IPAdapterSourceError(
                f"--ip-adapter {source}: no image_encoder folder next to the weight file ({enc_dir}); pass the CLIP "
                "image encoder with --image-encoder (a CLIPVisionModelWithProjection folder or hub id)")
    shim = type(pipe)(**parts)
    try:
        shim.load_ip_adapter(root, subfolder=subfolder, weight_name=weight, image_encoder_folder="image_encoder")
    except (KeyError, RuntimeError, ValueError) as e:  # weights for other layers / sizes than this UNet's
        if not isinstance(e, KeyError) and "expected shape" not in str(e) and "size mismatch" not in str(e):
            raise
        raise UnsupportedModelError(f"IP-Adapter {source} does not fit this pipeline's UNet (an SD1.5 IP-Adapter on "
                                    f"SDXL, or the reverse?): {type(e).__name__}: {str(e)[:300]}") from None
    if shim.image_encoder is None:
        raise IPAdapterSourceError(f"--ip-adapter {source}: no image encoder was loaded; pass --image-encoder")
    return shim


# -- graphs -----------------------------------------------------------------------------------------


class _TensorScale:
    """Stands for a processor's Python-float ``scale``: never ``== 0`` (diffusers' skip test), and
    ``scale * x`` multiplies each image of the batch by its ``ip_adapter_scale``."""

    __hash__ = None

    def __init__(self, t):
        self.t = t

    def __eq__(self, other):
        return False

    def __mul__(self, x):
        return self.t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * x

    __rmul__ = __mul__


class _PassThrough(torch.nn.Module):
    """Replaces ``unet.encoder_hid_proj``: the projected tokens come in as an input already."""

    def forward(self, image_embeds):
        return image_embeds


class _IPInputs:
    """Mixin over a UNet wrapper: ``ip_tokens`` and ``ip_adapter_scale`` inputs (see the module doc)."""

    def forward(self, *args):
        kw = dict(zip(self.input_names, args))
        procs = [p for p in self.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
        saved, proj = [p.scale for p in procs], self.unet.encoder_hid_proj
        for p in procs:
            p.scale = [_TensorScale(kw["ip_adapter_scale"])]
        self.unet.encoder_hid_proj = _PassThrough()
        try:
            return super().forward(*args)
        finally:
            self.unet.encoder_hid_proj = proj
            for p, s in zip(procs, saved):
                p.scale = s

    def conditioning_kwargs(self, kw: dict) -> dict:
        out = dict(super().conditioning_kwargs(kw))
        out["added_cond_kwargs"] = {**(out.get("added_cond_kwargs") or {}), "image_embeds": [kw["ip_tokens"]]}
        return out


_IP_CLASSES: dict = {}


def ip_wrapper_class(base_cls):
    """``base_cls`` (a UNet wrapper class) with the IP-Adapter inputs."""
    if base_cls not in _IP_CLASSES:
        _IP_CLASSES[base_cls] = type(f"IPAdapter{base_cls.__name__}", (_IPInputs, base_cls), {})
    return _IP_CLASSES[base_cls]


class ImageEncoderWrapper(torch.nn.Module):
    """CLIPVisionModelWithProjection -> image_embeds, or the penultimate hidden states."""

    def __init__(self, encoder, hidden_states: bool):
        super().__init__()
        self.encoder, self.hidden_states = encoder, hidden_states

    def forward(self, pixel_values):
        if self.hidden_states:
            return self.encoder(pixel_values, output_hidden_states=True, return_dict=True).hidden_states[-2]
        return self.encoder(pixel_values, return_dict=True).image_embeds


class ProjectionWrapper(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, image_embeds):
        return self.layer(image_embeds)


def _variant(layer) -> bool:
    """Whether the projection reads the encoder's hidden states (plus, full) rather than image_embeds."""
    from diffusers.models.embeddings import (ImageProjection, IPAdapterFullImageProjection,
                                             IPAdapterPlusImageProjection)

    if isinstance(layer, ImageProjection):
        return False
    if isinstance(layer, (IPAdapterPlusImageProjection, IPAdapterFullImageProjection)):
        return True
    raise UnsupportedModelError(f"IP-Adapter projection {type(layer).__name__} is not supported (FaceID variants "
                                "need face embeddings and LoRAs); plain, plus and full IP-Adapters are")


def _with_ip_inputs(spec: ComponentSpec, tokens: int, cross: int, name: str) -> ComponentSpec:
    ip = (TensorSpec("ip_tokens", "float32", ("B", tokens, cross)), TensorSpec("ip_adapter_scale", "float32", ("B",)))
    return ComponentSpec(name, spec.inputs + ip, spec.outputs)


def _describe(src) -> str:
    """A local file or folder's absolute path, a hub id, or the class of an in-memory model."""
    if isinstance(src, (str, os.PathLike)):
        return str(Path(src).resolve()) if Path(src).exists() else str(src)
    return type(src).__name__


def _image_processor(fe) -> dict:
    d = fe.to_dict()
    keys = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
            "do_convert_rgb", "image_mean", "image_std", "resample")
    return {k: d[k] for k in keys if k in d}


#: the bundle kinds whose runtime pipelines take image prompts
KINDS = ("lcm", "sd", "sdxl")


def ip_adapter_plans(pipe, constants: dict, plans, source, *, image_encoder=None, allow_pickle: bool = False,
                     kind: str | None = None,
                     progress: Callable[[str], None] = print) -> tuple[list[ComponentPlan], dict]:
    """Plans for the image encoder, the projection and an IP twin of every UNet graph in ``plans``
    (``unet``, and the residual UNets of ControlNets / T2I-Adapters); the manifest's ``extra["ip_adapter"]``."""
    if kind is not None and kind not in KINDS:
        raise UnsupportedModelError(f"--ip-adapter: a {kind!r} bundle takes no image prompts; IP-Adapters are for "
                                    f"{', '.join(KINDS)} pipelines")
    from .control import _ResidualInputs
    from .unclip_recipe import _crop_size

    progress(f"loading IP-Adapter {source}")
    shim = load_ip_adapter(pipe, source, image_encoder, allow_pickle=allow_pickle)
    layers = shim.unet.encoder_hid_proj.image_projection_layers
    if len(layers) != 1:
        raise UnsupportedModelError("one IP-Adapter per bundle is supported")
    layer = layers[0].eval()
    hidden = _variant(layer)
    enc = shim.image_encoder.eval()
    h, w = _crop_size(shim.feature_extractor)
    with torch.inference_mode():
        out = ImageEncoderWrapper(enc, hidden)(torch.zeros(1, 3, h, w, dtype=next(enc.parameters()).dtype))
        tokens = layer(out)
    n_tokens, cross = int(tokens.shape[1]), int(tokens.shape[2])
    if cross != int(constants["cross_attention_dim"]):
        raise UnsupportedModelError(f"IP-Adapter {source} gives {cross}-wide tokens but the UNet's cross_attention_dim "
                                    f"is {constants['cross_attention_dim']} (an SD1.5 IP-Adapter on SDXL, or the reverse?)")
    emb_name = "penultimate_hidden_states" if hidden else "image_embeds"
    emb = TensorSpec(emb_name, "float32", ("B", *out.shape[1:]))
    enc_spec = ComponentSpec(IMAGE_ENCODER, (TensorSpec("pixel_values", "float32", ("B", 3, h, w)),), (emb,))
    proj_spec = ComponentSpec(PROJECTION, (emb,), (TensorSpec("ip_tokens", "float32", ("B", n_tokens, cross)),))
    out_plans = [ComponentPlan(enc_spec, ImageEncoderWrapper(enc, hidden)),
                 ComponentPlan(proj_spec, ProjectionWrapper(layer))]
    twins = {}
    for p in plans:
        wrapper = p.module
        if not hasattr(wrapper, "unet") or not hasattr(wrapper, "input_names"):
            continue
        if p.spec.name != "unet" and not isinstance(wrapper, _ResidualInputs):
            continue
        name = IP_UNET if p.spec.name == "unet" else p.spec.name + IP_SUFFIX
        spec = _with_ip_inputs(p.spec, n_tokens, cross, name)
        module = ip_wrapper_class(type(wrapper))(shim.unet, [s.name for s in spec.inputs])
        out_plans.append(ComponentPlan(spec, module, {**p.value_ranges, "ip_adapter_scale": (0, 1)}))
        twins[p.spec.name] = name
    extra = {"unet": IP_UNET, "twins": twins, "image_encoder": IMAGE_ENCODER, "projection": PROJECTION,
             "image_embeds": emb_name, "num_tokens": n_tokens, "source": _describe(source),
             "image_encoder_source": None if image_encoder is None else _describe(image_encoder),
             "projection_type": type(layer).__name__, "image_processor": _image_processor(shim.feature_extractor)}
    return out_plans, extra


def manifest_ip_adapter_plans(pipe, constants: dict, plans, info: dict) -> list[ComponentPlan]:
    """The IP-Adapter plans of a bundle's ``extra["ip_adapter"]``, from the sources it records (for the
    torch backend, which runs each component's own torch module)."""
    return ip_adapter_plans(pipe, constants, plans, info["source"], image_encoder=info.get("image_encoder_source"),
                            allow_pickle=True, progress=lambda *_: None)[0]


def residual_twin_plan(src, manifest, residual: ComponentPlan, info: dict) -> ComponentPlan:
    """The IP twin of ``residual`` (a residual UNet graph being added to an IP-Adapter bundle by
    ``--add-to``), with the IP-Adapter the bundle records loaded into ``src``'s UNet."""
    from .bundle import load_pipeline

    pipe = src if hasattr(src, "unet") else load_pipeline(src)[0]
    twins = ip_adapter_plans(pipe, dict(manifest.constants), [residual], info["source"],  # accepted at export
                             image_encoder=info.get("image_encoder_source"), allow_pickle=True,
                             progress=lambda *_: None)[0]
    return next(p for p in twins if p.spec.name == residual.spec.name + IP_SUFFIX)
