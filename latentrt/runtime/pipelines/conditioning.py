"""ControlNet and T2I-Adapter conditioning for the shared denoising loop.

The bundle's graphs compute residuals at scale 1 (``controlnet_*``), or features unscaled
(``adapter``); everything a request varies is arithmetic here, exactly as diffusers does it:

* ``controlnet_conditioning_scale`` (one float, or one per ControlNet; default 1.0, and 0.8 in image-to-image as
  in diffusers' ControlNet image-to-image pipelines) multiplies each ControlNet's
  residuals; in ``guess_mode`` (or for a ControlNet with ``global_pool_conditions``) the i-th of the
  n down residuals is scaled by ``logspace(-1, 0, n + 1)[i]`` times that, the mid one by the scale;
* ``control_guidance_start`` / ``control_guidance_end`` keep a ControlNet at step i of N unless
  ``i / N < start`` or ``(i + 1) / N > end``;
* several ControlNets' residuals are summed in order;
* ``guess_mode`` with classifier-free guidance runs the ControlNets on the conditional half of the
  batch only, and the unconditional half gets zero residuals;
* the adapter runs once per call; its features times ``adapter_conditioning_scale`` are added while
  ``i < int(N * adapter_conditioning_factor)`` (diffusers' SDXL rule, used for SD too).

A step whose ControlNets are all switched off (scale 0 or outside their window) runs the plain
``unet`` graph, which gives the same result as adding zero residuals; so does every step of a call
without a control image, and those cost what they cost in a bundle without ControlNets.

Control images are preprocessed like diffusers' ``control_image_processor`` (PIL: resized with
Lanczos to the call's size and converted to RGB; values in [0, 1], not normalised) and its adapter
preprocessing (PIL resized with Lanczos; the image keeps its own channels, /255). Arrays must already
have the call's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...spec import concrete_shape
from ..image import ImageInputError, _array_to_nhwc, _is_pil

try:
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

#: the keyword arguments every SD-family pipeline call takes for conditioning (diffusers' names)
CONTROL_ARGS = ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
                "guess_mode", "adapter_conditioning_scale", "adapter_conditioning_factor")

ADD_HINT = ("export the bundle with `latentrt export SRC -o BUNDLE --controlnet CN` (or --adapter AD), or add one "
            "with `latentrt export --add-to BUNDLE --controlnet CN`")


class ControlInputError(ValueError):
    """A conditioning argument does not fit the bundle or the call."""


def control_info(bundle) -> dict:
    """``manifest.extra["control"]``: ``controlnets`` (in order), ``controlnet_unet``, ``adapter``."""
    return dict(bundle.manifest.extra.get("control") or {})


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ControlInputError(f"{name} must be a number; got {v!r}")
    return float(v)


def _per_net(name: str, v, n: int, default: float) -> list[float]:
    """A number for every ControlNet, or a list of one per ControlNet."""
    if v is None:
        return [default] * n
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ControlInputError(f"{name} has {len(v)} values but the bundle has {n} ControlNet(s); pass one "
                                    f"per ControlNet (in the bundle's order) or a single number")
        return [_number(name, x) for x in v]
    return [_number(name, v)] * n


def _image_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _size_of(image) -> tuple[int, int]:
    if _is_pil(image):
        return image.height, image.width
    a = np.asarray(image)
    if a.ndim == 2:
        return a.shape
    if a.ndim == 3:
        return a.shape[:2]
    if a.ndim == 4:
        return a.shape[1:3]
    raise ImageInputError(f"control image array has shape {a.shape}; expected HW, HWC or NHWC")


def _check_size(what: str, got: tuple[int, int], height: int, width: int) -> None:
    if tuple(got) != (height, width):
        raise ControlInputError(
            f"{what} is {got[0]}x{got[1]} (HxW) but this call generates {height}x{width}; pass a control image of "
            f"that size, a PIL image (resized as diffusers does), or height/width matching it")


def controlnet_pixels(images: list, height: int, width: int) -> np.ndarray:
    """diffusers' ``control_image_processor.preprocess``: NCHW float32 in [0, 1], RGB."""
    if all(_is_pil(i) for i in images):
        out = [np.asarray((i if i.size == (width, height) else i.resize((width, height), Image.LANCZOS)).convert("RGB"),
                          np.float32) / np.float32(255.0) for i in images]
        return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))
    if all(isinstance(i, np.ndarray) for i in images):
        nhwc = np.concatenate([_array_to_nhwc(i) for i in images], axis=0)
        _check_size("the control image", nhwc.shape[1:3], height, width)
        return np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    raise ImageInputError("control_image must be a PIL image, a numpy array (HWC / NHWC, uint8 or float in [0, 1]) or "
                          f"a list of them; got {sorted({type(i).__name__ for i in images})}")


def adapter_pixels(images: list, height: int, width: int, channels: int) -> np.ndarray:
    """diffusers' ``_preprocess_adapter_image``: PIL resized with Lanczos, its own channels, / 255.
    An image whose channel count is not the adapter's is converted (gray "L" or "RGB")."""
    arrays = []
    for i in images:
        if _is_pil(i):
            i = i if i.size == (width, height) else i.resize((width, height), Image.LANCZOS)
            a = np.asarray(i)
            if (1 if a.ndim == 2 else a.shape[-1]) != channels:
                a = np.asarray(i.convert("L" if channels == 1 else "RGB"))
            a = a.astype(np.float32) / np.float32(255.0)
        elif isinstance(i, np.ndarray):
            a = i.astype(np.float32) / np.float32(255.0) if i.dtype == np.uint8 else i.astype(np.float32)
        else:
            raise ImageInputError(f"control_image for a T2I-Adapter must be a PIL image or a numpy array; got "
                                  f"{type(i).__name__}")
        a = a[None, ..., None] if a.ndim == 2 else a[None] if a.ndim == 3 else a
        if a.ndim != 4 or a.shape[-1] != channels:
            raise ControlInputError(f"the adapter takes {channels}-channel images; got an array of shape {i.shape if isinstance(i, np.ndarray) else a.shape}")
        _check_size("the adapter image", a.shape[1:3], height, width)
        arrays.append(a)
    return np.ascontiguousarray(np.concatenate(arrays, axis=0).transpose(0, 3, 1, 2))


def _repeat_for_batch(x: np.ndarray, batch: int, per_prompt: int, what: str) -> np.ndarray:
    """``prepare_image``: one image serves the whole batch; else one per prompt, repeated per image."""
    k = x.shape[0]
    if k == 1:
        return np.repeat(x, batch * per_prompt, axis=0)
    if k != batch:
        raise ControlInputError(f"{what} has {k} images but there are {batch} prompts; pass 1 image or one per prompt")
    return np.repeat(x, per_prompt, axis=0)


@dataclass
class ControlRequest:
    """A call's conditioning arguments, checked against the bundle."""

    images: list  # per ControlNet: a list of images (the batch); for the adapter: one list
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    adapter_scale: float
    adapter_factor: float
    info: dict = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return "adapter" in self.info

    def size(self, pipe, height: int | None, width: int | None) -> tuple[int | None, int | None]:
        """diffusers' default size: the first control image's, rounded down to a multiple of the VAE
        factor (ControlNet) or the adapter's downscale factor."""
        if height is not None and width is not None:
            return height, width
        h, w = _size_of(self.images[0][0])
        m = int(self.info["adapter"]["downscale_factor"]) if self.is_adapter else pipe.vae_scale_factor
        return height or h - h % m, width or w - w % m

    def prepare(self, pipe, height: int, width: int, batch: int, per_prompt: int, cfg: bool) -> "Conditioning":
        """Preprocess the images (and run the adapter once) for a batch of ``batch`` prompts."""
        if self.is_adapter:
            ad = self.info["adapter"]
            pixels = adapter_pixels(self.images[0], height, width, int(ad["in_channels"]))
            feats = pipe.run_lazy(ad["component"], image=pixels)
            names = [f"adapter_feature_{j}" for j in range(int(ad["features_used"]))]
            bs = batch * per_prompt
            state = {}
            for n in names:
                v = np.asarray(feats[n], np.float32) * np.float32(self.adapter_scale)
                v = np.tile(v, (per_prompt, 1, 1, 1)) if per_prompt > 1 else v  # diffusers: repeat, not interleave
                if v.shape[0] == 1:
                    v = np.repeat(v, bs, axis=0)
                elif v.shape[0] != bs:
                    raise ControlInputError(f"the adapter image batch ({len(self.images[0])}) does not fit {batch} "
                                            "prompt(s); pass 1 image or one per prompt")
                state[n] = np.concatenate([v, v], axis=0) if cfg else v
            return Conditioning(self, [], {ad["unet"]: state}, cfg)
        double = cfg and not self.guess_mode
        images = []
        for k, imgs in enumerate(self.images):
            x = _repeat_for_batch(controlnet_pixels(imgs, height, width), batch, per_prompt,
                                  f"control_image[{k}]" if len(self.images) > 1 else "control_image")
            images.append(np.concatenate([x, x], axis=0) if double else x)
        return Conditioning(self, images, {}, cfg)


def control_request(pipe, control: dict, *, image_to_image: bool = False) -> ControlRequest | None:
    """Check a call's conditioning keyword arguments (:data:`CONTROL_ARGS`) against the bundle;
    ``None`` when the call has no control image."""
    unknown = sorted(set(control) - set(CONTROL_ARGS))
    if unknown:
        raise TypeError(f"{type(pipe).__name__}() got unexpected keyword argument(s) {unknown}")
    image = control.get("control_image")
    given = [k for k in CONTROL_ARGS[1:] if control.get(k) not in (None, False)]
    if image is None:
        if given:
            raise ControlInputError(f"{', '.join(given)} need(s) control_image (the conditioning image)")
        return None
    info = control_info(pipe.bundle)
    nets = info.get("controlnets") or []
    if not nets and "adapter" not in info:
        raise ControlInputError(f"{pipe.bundle.path}: control_image was given but this bundle has no ControlNet or "
                                f"T2I-Adapter; {ADD_HINT}")
    guess = control.get("guess_mode") or False
    if not isinstance(guess, (bool, np.bool_)):
        raise ControlInputError(f"guess_mode must be True or False; got {guess!r}")
    if "adapter" in info:
        wrong = [k for k in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
                 if control.get(k) is not None] + (["guess_mode"] if guess else [])
        if wrong:
            raise ControlInputError(f"{', '.join(wrong)} are for ControlNets; this bundle has a T2I-Adapter (use "
                                    "adapter_conditioning_scale / adapter_conditioning_factor)")
        factor = control.get("adapter_conditioning_factor")
        factor = 1.0 if factor is None else _number("adapter_conditioning_factor", factor)
        if not 0.0 <= factor <= 1.0:
            raise ControlInputError(f"adapter_conditioning_factor must be in [0, 1] (the fraction of the steps that "
                                    f"get the adapter's features); got {factor}")
        scale = control.get("adapter_conditioning_scale")
        scale = 1.0 if scale is None else _number("adapter_conditioning_scale", scale)
        return ControlRequest([_image_list(image)], [], [], [], False, scale, factor, info)
    wrong = [k for k in ("adapter_conditioning_scale", "adapter_conditioning_factor") if control.get(k) is not None]
    if wrong:
        raise ControlInputError(f"{', '.join(wrong)} are for T2I-Adapters; this bundle has ControlNets (use "
                                "controlnet_conditioning_scale)")
    n = len(nets)
    if n == 1:
        images = [_image_list(image)]
    else:
        if not isinstance(image, (list, tuple)) or len(image) != n:
            got = len(image) if isinstance(image, (list, tuple)) else 1
            raise ControlInputError(f"this bundle has {n} ControlNets ({', '.join(c['source'] for c in nets)}) but "
                                    f"{got} control image(s) were given; pass a list of {n}, one per ControlNet in "
                                    "this order")
        images = [_image_list(i) for i in image]
    # diffusers' default scale: 1.0 for text-to-image, 0.8 in its ControlNet image-to-image pipelines
    scales = _per_net("controlnet_conditioning_scale", control.get("controlnet_conditioning_scale"), n,
                      0.8 if image_to_image else 1.0)
    starts = _per_net("control_guidance_start", control.get("control_guidance_start"), n, 0.0)
    ends = _per_net("control_guidance_end", control.get("control_guidance_end"), n, 1.0)
    for s, e in zip(starts, ends):
        if s >= e:
            raise ControlInputError(f"control_guidance_start ({s}) must be smaller than control_guidance_end ({e})")
        if s < 0.0 or e > 1.0:
            raise ControlInputError(f"control_guidance_start ({s}) and control_guidance_end ({e}) must lie in [0, 1]")
    guess = bool(guess) or any(c.get("global_pool_conditions") for c in nets[:1])  # diffusers reads the first net
    return ControlRequest(images, scales, starts, ends, guess, 1.0, 1.0, info)


def _second_half(x):
    return x[x.shape[0] // 2:]


@dataclass
class Conditioning:
    """A prepared request: what :func:`~.guidance.denoise` asks, step by step, for the UNet to run
    and its residual inputs."""

    request: ControlRequest
    images: list  # per ControlNet: NCHW [0, 1] for the batch it runs on
    fixed: dict  # UNet component -> residual inputs for every conditioned step (the adapter's)
    cfg: bool

    def unet_inputs(self, pipe, i: int, n_steps: int, inputs: dict, default_unet: str) -> tuple[str, dict]:
        """(UNet component, extra inputs) for step ``i`` of ``n_steps``; ``inputs`` are the UNet's
        inputs of the step (the doubled batch with guidance)."""
        req = self.request
        if req.is_adapter:
            if i < int(n_steps * req.adapter_factor):
                (unet, state), = self.fixed.items()
                return unet, _with_gate(pipe, unet, state, inputs)
            return default_unet, {}
        nets = req.info["controlnets"]
        summed = None
        guess_half = req.guess_mode and self.cfg
        for k, net in enumerate(nets):
            keep = 1.0 - float(i / n_steps < req.starts[k] or (i + 1) / n_steps > req.ends[k])
            scale = req.scales[k] * keep
            if scale == 0.0:  # adds exact zeros in diffusers: skip the net
                continue
            spec = pipe.bundle.manifest.components[net["component"]].spec
            feed = {s.name: (_second_half(inputs[s.name]) if guess_half else inputs[s.name])
                    for s in spec.inputs if s.name != "controlnet_cond"}
            out = pipe.run_lazy(net["component"], controlnet_cond=self.images[k], **feed)
            names = [s.name for s in spec.outputs]
            if req.guess_mode and not net.get("global_pool_conditions"):
                factors = np.logspace(-1, 0, len(names), dtype=np.float64).astype(np.float32) * np.float32(scale)
            else:
                factors = np.full(len(names), scale, dtype=np.float32)
            res = {nm: np.asarray(out[nm], np.float32) * f for nm, f in zip(names, factors)}
            summed = res if summed is None else {nm: summed[nm] + res[nm] for nm in names}
        unet = req.info["controlnet_unet"]
        if summed is None:
            if "timestep_cond" in inputs or not _has_input(pipe, default_unet, "timestep_cond"):
                return default_unet, {}
            # an LCM UNet run without its guidance embedding: only the residual graph can (zero residuals)
            summed = {s.name: np.zeros(concrete_shape(s, _sizes(pipe, inputs)), np.float32)
                      for s in pipe.bundle.manifest.components[unet].spec.inputs if s.name.startswith(_RESIDUALS)}
        elif guess_half:  # the unconditional half gets no control
            summed = {nm: np.concatenate([np.zeros_like(v), v], axis=0) for nm, v in summed.items()}
        return unet, _with_gate(pipe, unet, summed, inputs)


_RESIDUALS = ("down_block_res_", "mid_block_res", "adapter_feature_")


def _has_input(pipe, component: str, name: str) -> bool:
    return any(s.name == name for s in pipe.bundle.manifest.components[component].spec.inputs)


def _sizes(pipe, inputs: dict) -> dict:
    b, _, h, w = inputs["sample"].shape
    return {"B": b, "H": h * pipe.vae_scale_factor, "W": w * pipe.vae_scale_factor}


def _with_gate(pipe, unet: str, residuals: dict, inputs: dict) -> dict:
    """An LCM UNet's residual graph takes ``timestep_cond_gate``: 1 with the step's ``timestep_cond``,
    0 (and zeros for it) when the pipeline passes none, as ``StableDiffusionControlNetImg2ImgPipeline``."""
    if not _has_input(pipe, unet, "timestep_cond_gate"):
        return residuals
    b = inputs["sample"].shape[0]
    if "timestep_cond" in inputs:
        return {**residuals, "timestep_cond_gate": np.ones(b, np.float32)}
    dim = int(pipe.constants["time_cond_proj_dim"])
    return {**residuals, "timestep_cond_gate": np.zeros(b, np.float32),
            "timestep_cond": np.zeros((b, dim), np.float32)}


def check_image_to_image(req: ControlRequest | None, pipe, *, supported: bool = True) -> None:
    """Refuse conditioning a pipeline has no image-to-image form of in diffusers."""
    if req is None:
        return
    if req.is_adapter:
        raise ControlInputError("T2I-Adapters are text-to-image only (diffusers has no adapter image-to-image "
                                "pipeline); drop image= or control_image=")
    if not supported:
        raise ControlInputError(f"{type(pipe).__name__}: ControlNet image-to-image is not supported yet; drop image= "
                                "(text-to-image with control_image works)")


def image_to_image_size(req: ControlRequest, pipe, height, width, latents: np.ndarray) -> tuple[int, int]:
    """``StableDiffusionControlNetImg2ImgPipeline``: the init image and the control images are each
    preprocessed at the call's height/width (``None``: their own size); they must agree."""
    f = pipe.vae_scale_factor
    h, w = latents.shape[2] * f, latents.shape[3] * f
    ch, cw = req.size(pipe, height, width)
    if (ch, cw) != (h, w):
        raise ControlInputError(f"the control image is {ch}x{cw} (HxW) but the init image is {h}x{w}; pass images of "
                                "one size, or height and width (PIL images are then resized to it)")
    return h, w
