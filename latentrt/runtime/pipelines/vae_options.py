"""``enable_vae_tiling`` / ``enable_vae_slicing`` and the per-call ``vae_tiling=`` / ``vae_slicing=``.

The ``enable_*`` / ``disable_*`` methods set the pipeline's defaults (as diffusers' methods set the
VAE's flags); a call's ``vae_tiling`` / ``vae_slicing`` override them for that call only. The call's
choice is kept per thread, so concurrent calls on one pipeline object never see each other's. The
tiling itself is :mod:`latentrt.runtime.vae_tiling`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..vae_tiling import TileConfig, VaeOptions

TINY_TILING = ("vae_tiling works with the full VAE (AutoencoderKL), not with vae='tiny' (TAESD, whose tiling "
               "differs); use vae_slicing with it, or vae='full'")



class VaeTiling:
    """Mixin of :class:`~.base.BasePipeline`: how ``decode`` / ``encode_image`` run the VAE engines."""

    vae_defaults: VaeOptions = VaeOptions()  # an instance attribute once an enable_/disable_ method ran

    def tile_config(self, **overrides) -> TileConfig:
        """The bundle's VAE tile sizes (``sample_size``, ``latent_size``, ``overlap_factor`` override them)."""
        return TileConfig.from_constants(self.constants, str(self.bundle.path), **overrides)

    def enable_vae_tiling(self, tile_sample_min_size: int | None = None, tile_latent_min_size: int | None = None,
                          tile_overlap_factor: float | None = None) -> None:
        """Decode and encode in overlapping tiles by default (diffusers' ``enable_vae_tiling``); the sizes
        default to the VAE config's, recorded at export (set them as diffusers users set
        ``vae.tile_sample_min_size`` & co.)."""
        tiles = self.tile_config(sample_size=tile_sample_min_size, latent_size=tile_latent_min_size,
                                 overlap_factor=tile_overlap_factor)
        self.vae_defaults = replace(self.vae_defaults, tiling=True, tiles=tiles)

    def disable_vae_tiling(self) -> None:
        self.vae_defaults = replace(self.vae_defaults, tiling=False)

    def enable_vae_slicing(self) -> None:
        """Decode and encode one image of the batch at a time by default (diffusers' ``enable_vae_slicing``)."""
        self.vae_defaults = replace(self.vae_defaults, slicing=True)

    def disable_vae_slicing(self) -> None:
        self.vae_defaults = replace(self.vae_defaults, slicing=False)

    def set_vae_options(self, tiling: bool | None = None, slicing: bool | None = None, vae: str = "full") -> None:
        """This thread's call: the defaults, with ``tiling`` / ``slicing`` (when not None) overriding them,
        for the call's ``vae`` ("full" or "tiny")."""
        opts = self.vae_defaults
        for name, value in (("tiling", tiling), ("slicing", slicing)):
            if value is not None:
                if not isinstance(value, (bool, np.bool_)):
                    raise TypeError(f"vae_{name} must be True, False or None; got {value!r}")
                opts = replace(opts, **{name: bool(value)})
        if opts.tiling and vae == "tiny":
            raise ValueError(TINY_TILING)
        if opts.tiling and opts.tiles is None:
            opts = replace(opts, tiles=self.tile_config())  # a clear error now for bundles without tile sizes
        self._call.vae_options = opts  # this thread's call (BasePipeline's CallState)

    def tile_above(self, pixels: int, limit: int, tiling: bool | None, slicing: bool | None) -> bool:
        """Turn tiling on for this call when its output has more than ``limit`` pixels, the call did not set
        ``vae_tiling`` and the bundle records tile sizes (older bundles decode whole). True when it did."""
        keys = ("vae_tile_sample_min_size", "vae_tile_latent_min_size")
        if tiling is not None or self.vae_options().tiling or pixels <= limit or not all(k in self.constants for k in keys):
            return False
        self.set_vae_options(True, slicing)
        return True

    def vae_options(self) -> VaeOptions:
        return self._call.vae_options or self.vae_defaults

    def run_vae(self, component: str, x: np.ndarray, direction: str, inp: str, out: str) -> np.ndarray:
        """A VAE component (input ``inp``, output ``out``) on ``x``, tiled and/or sliced as this call says;
        ``direction`` is ``"decode"`` or ``"encode"``."""
        opts = self.vae_options()
        if opts.tiling and component.startswith("tiny_"):
            raise ValueError(TINY_TILING)
        return opts.apply(lambda a: self.run(component, **{inp: a})[out], x, direction, self.tile_config)
