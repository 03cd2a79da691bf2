"""IP-Adapter image prompts for the SD-family pipelines (LCM, SD, SDXL), as diffusers runs them.

A bundle exported with ``--ip-adapter`` (:mod:`latentrt.export.ip_adapter`) has an ``image_encoder``, an
``image_projection`` and a UNet graph with two more inputs (``ip_tokens``, ``ip_adapter_scale``). A call
with ``ip_adapter_image`` (or ``ip_adapter_image_embeds``) does what diffusers'
``prepare_ip_adapter_image_embeds`` and the UNet's image projection do:

* the image gets CLIP's preprocessing (the bundle records the pipeline's ``feature_extractor`` settings;
  :mod:`..clip_image`) and goes through the encoder: ``image_embeds`` for plain IP-Adapters, the
  penultimate hidden states for "plus" / "full" ones;
* with classifier-free guidance the negative image embedding is zeros (plain) or the encoder's output
  for an all-zero image (plus), and the doubled batch is [negatives; positives], each repeated to every
  image of the call (``batch_size * num_images_per_prompt``); LCM runs no CFG and has no negatives;
* ``ip_adapter_image_embeds`` is diffusers' list with one array per IP-Adapter, (2 if CFG else 1, 1, D)
  for plain adapters or (2 or 1, 1, tokens, width) for plus ones (negatives first with CFG);
* the projection runs once per call (its tokens are the same at every step) and the tokens and
  ``ip_adapter_scale`` (default 1.0, diffusers' scale after ``load_ip_adapter``) are per-call UNet inputs
  of the shared denoising loop (``unet_inputs=`` of :func:`.guidance.denoise`).

A call without an image prompt runs the plain ``unet`` graph and costs what it costs in a bundle
without an IP-Adapter. With ControlNets or a T2I-Adapter in the bundle, the conditioning's residual UNet
graph is swapped for its IP twin (exported with it), so both condition one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..clip_image import CLIPImageConfig, clip_preprocess

#: the keyword arguments of an image prompt (diffusers' names)
IP_ARGS = ("ip_adapter_image", "ip_adapter_image_embeds", "ip_adapter_scale")

HINT = "export the bundle with `latentrt export SRC -o BUNDLE --ip-adapter SOURCE` (an IP-Adapter weight file)"


class IPAdapterInputError(ValueError):
    """An image-prompt argument that does not fit the bundle or the call."""


def ip_adapter_info(bundle) -> dict | None:
    return bundle.manifest.extra.get("ip_adapter") or None


def _scale(v) -> float:
    if v is None:
        return 1.0
    if isinstance(v, dict):
        raise IPAdapterInputError("ip_adapter_scale must be a number; per-block scales (a dict, InstantStyle) are not "
                                  "supported: the bundle's graph takes one scale for every IP attention layer")
    if isinstance(v, (list, tuple)) and len(v) == 1:
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        raise IPAdapterInputError(f"ip_adapter_scale must be a (finite) number, e.g. 0.6; got {v!r}")
    return float(v)


def _one_per_adapter(value, name: str, fix: str):
    """diffusers' list of one entry per IP-Adapter (or the entry itself): the entry of the bundle's one adapter."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise IPAdapterInputError(f"{name} has {len(value)} entries but the bundle has 1 IP-Adapter; {fix}")
        return value[0]
    return value


@dataclass
class IPAdapterRequest:
    """A call's image prompt, checked against the bundle; :meth:`prepare` gives the UNet inputs."""

    info: dict
    image: Any
    embeds: Any
    scale: float

    @property
    def hidden_states(self) -> bool:
        return self.info["image_embeds"] == "penultimate_hidden_states"

    def _encode(self, pipe, cfg: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """diffusers' ``encode_image``: (positive, negative or None) encoder outputs of one image."""
        image = _one_per_adapter(self.image, "ip_adapter_image",
                                 "pass one image (several images per adapter are not supported)")
        if isinstance(image, (list, tuple)):
            raise IPAdapterInputError("several images for one IP-Adapter are not supported; pass one image")
        pixels = clip_preprocess(image, CLIPImageConfig.from_dict(self.info["image_processor"]))
        if pixels.shape[0] != 1:
            raise IPAdapterInputError(f"ip_adapter_image gives {pixels.shape[0]} images; pass one")
        name, out = self.info["image_encoder"], self.info["image_embeds"]
        if self.hidden_states and cfg:  # the negative is the encoder's output for a black (all-zero) input
            both = np.asarray(pipe.run_lazy(name, pixel_values=np.concatenate([pixels, np.zeros_like(pixels)]))[out],
                              np.float32)
            return both[:1], both[1:]
        pos = np.asarray(pipe.run_lazy(name, pixel_values=pixels)[out], np.float32)
        return pos, (np.zeros_like(pos) if cfg else None)

    def _given(self, pipe, cfg: bool) -> tuple[np.ndarray, np.ndarray | None]:
        e = _one_per_adapter(self.embeds, "ip_adapter_image_embeds", "pass a list with one array")
        a = np.asarray(e, dtype=np.float32)
        spec = pipe.bundle.manifest.components[self.info["projection"]].spec.inputs[0]
        want = tuple(spec.shape[1:])
        if a.ndim != len(want) + 2 or tuple(a.shape[2:]) != want:
            raise IPAdapterInputError(
                f"ip_adapter_image_embeds has shape {a.shape}; this bundle's IP-Adapter takes (2 if classifier-free "
                f"guidance else 1, 1, {', '.join(map(str, want))}) ({self.info['image_embeds']}, negatives first "
                "with guidance)")
        if a.shape[1] != 1:
            raise IPAdapterInputError(f"ip_adapter_image_embeds holds {a.shape[1]} images per prompt; pass 1")
        k = 2 if cfg else 1
        if a.shape[0] != k:
            raise IPAdapterInputError(
                f"ip_adapter_image_embeds has {a.shape[0]} rows; this call {'uses' if cfg else 'has no'} classifier-free "
                f"guidance, so pass {k} ({'[negative, positive]' if cfg else 'the positive embedding'})")
        a = a[:, 0]
        return (a[1:], a[:1]) if cfg else (a, None)

    def prepare(self, pipe, images: int, cfg: bool) -> tuple[str, dict]:
        """(UNet component, its extra inputs) for a call of ``images`` images (doubled with ``cfg``)."""
        pos, neg = self._encode(pipe, cfg) if self.embeds is None else self._given(pipe, cfg)
        feed = np.concatenate([neg, pos]) if cfg else pos
        tokens = np.asarray(pipe.run_lazy(self.info["projection"], **{self.info["image_embeds"]: feed})["ip_tokens"],
                            np.float32)
        rows = [np.repeat(tokens[j:j + 1], images, axis=0) for j in range(tokens.shape[0])]
        tokens = np.ascontiguousarray(np.concatenate(rows))
        unet = self.info["unet"]
        pipe.engine_for(unet)  # the loop reads the engine before its first step
        return unet, {"ip_tokens": tokens, "ip_adapter_scale": np.full(tokens.shape[0], self.scale, np.float32)}

    def with_conditioning(self, pipe, conditioning):
        """The ControlNet / T2I-Adapter conditioning of the call, running the IP twins of its UNet graphs."""
        if conditioning is None:
            return None
        twins = self.info.get("twins") or {}
        ctrl = conditioning.request.info
        graphs = [ctrl["adapter"]["unet"]] if "adapter" in ctrl else [ctrl["controlnet_unet"]]
        missing = [g for g in graphs if g not in twins]
        if missing:
            raise IPAdapterInputError(
                f"{pipe.bundle.path}: the conditioning graph {missing[0]} has no IP-Adapter inputs (ControlNets added "
                "to the bundle after its export); re-export with --ip-adapter and --controlnet together, or drop "
                "ip_adapter_image or control_image")
        for g in graphs:
            pipe.engine_for(twins[g])
        return _IPConditioning(conditioning, twins)


@dataclass
class _IPConditioning:
    """A :class:`~.conditioning.Conditioning` whose residual UNet graphs are their IP twins."""

    inner: Any
    twins: dict

    def unet_inputs(self, pipe, i: int, n_steps: int, inputs: dict, default_unet: str) -> tuple[str, dict]:
        unet, extra = self.inner.unet_inputs(pipe, i, n_steps, inputs, default_unet)
        return (unet if unet == default_unet else self.twins[unet]), extra


def ip_adapter_request(pipe, kwargs: dict) -> IPAdapterRequest | None:
    """Take the image-prompt arguments (:data:`IP_ARGS`) out of a call's keyword arguments ``kwargs`` and
    check them against the bundle; ``None`` when the call has no image prompt."""
    image, embeds = kwargs.pop("ip_adapter_image", None), kwargs.pop("ip_adapter_image_embeds", None)
    raw_scale = kwargs.pop("ip_adapter_scale", None)
    scale = _scale(raw_scale)
    if image is None and embeds is None:
        if raw_scale is not None:
            raise IPAdapterInputError("ip_adapter_scale needs an image prompt: pass ip_adapter_image (or "
                                      "ip_adapter_image_embeds)")
        return None
    info = ip_adapter_info(pipe.bundle)
    what = "ip_adapter_image" if image is not None else "ip_adapter_image_embeds"
    if info is None:
        raise IPAdapterInputError(f"{pipe.bundle.path}: {what} was given but this bundle has no IP-Adapter; {HINT}")
    if image is not None and embeds is not None:
        raise IPAdapterInputError("pass either ip_adapter_image or ip_adapter_image_embeds, not both")
    return IPAdapterRequest(info, image, embeds, scale)


def ip_denoise_args(ip: IPAdapterRequest | None, pipe, images: int, cfg: bool, unet_inputs: dict | None,
                    conditioning) -> dict:
    """The keyword arguments of :func:`.guidance.denoise` that an image prompt changes: ``unet``,
    ``unet_inputs`` (plus ``ip_tokens`` / ``ip_adapter_scale``) and ``conditioning``."""
    if ip is None:
        return {"unet_inputs": unet_inputs, "conditioning": conditioning}
    unet, extra = ip.prepare(pipe, images, cfg)
    return {"unet": unet, "unet_inputs": {**(unet_inputs or {}), **extra},
            "conditioning": ip.with_conditioning(pipe, conditioning)}
