"""VAE tiling and slicing: decode and encode big images (or big batches) a tile (or an image) at a time.

Reproduces diffusers' ``AutoencoderKL.tiled_decode`` / ``_tiled_encode`` (and its ``use_slicing``
batch split): the input is cut into overlapping square tiles of ``tile_latent_min_size`` latents
(decode) or ``tile_sample_min_size`` pixels (encode), stepping by ``(1 - tile_overlap_factor)`` of a
tile; each tile goes through the engine alone; each output tile is blended, in place and in row-major
order as diffusers does (so the tile above and the one to the left are already blended themselves),
with a linear ramp over ``blend_extent`` rows / columns, then cropped to ``row_limit`` and the crops
concatenated. Tiling runs only when a side exceeds the tile, as in diffusers; the engine then never
sees more than a tile, which is what bounds memory.

The tile sizes come from the VAE's config, recorded at export in the manifest's constants
(``vae_tile_sample_min_size``, ``vae_tile_latent_min_size``, ``vae_tile_overlap_factor``); they can be
overridden as diffusers users set ``vae.tile_sample_min_size`` & co.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..manifest import REEXPORT_HINT, BundleError

Run = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TileConfig:
    """diffusers' ``AutoencoderKL`` tiling attributes."""

    sample_size: int  # tile_sample_min_size: a tile's side in pixels
    latent_size: int  # tile_latent_min_size: a tile's side in latents
    overlap_factor: float = 0.25  # tile_overlap_factor

    def __post_init__(self):
        for name in ("sample_size", "latent_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"tile {name} must be a positive integer; got {v!r}")
        if not 0.0 <= float(self.overlap_factor) < 1.0:
            raise ValueError(f"tile_overlap_factor must be in [0, 1); got {self.overlap_factor!r}")

    @classmethod
    def from_constants(cls, constants: dict, where: str = "this bundle", **overrides) -> "TileConfig":
        """From a manifest's constants; ``overrides`` (``sample_size``, ``latent_size``, ``overlap_factor``)
        win. Bundles exported before tiling existed have no tile sizes: both sizes must then be given."""
        keys = {"sample_size": "vae_tile_sample_min_size", "latent_size": "vae_tile_latent_min_size",
                "overlap_factor": "vae_tile_overlap_factor"}
        values = {k: constants.get(key) for k, key in keys.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["overlap_factor"] is None:
            values["overlap_factor"] = 0.25
        if values["sample_size"] is None or values["latent_size"] is None:
            raise BundleError(f"{where} records no VAE tile sizes (it was exported before latentrt had VAE tiling); "
                              f"{REEXPORT_HINT}, or pass the VAE config's sizes: enable_vae_tiling("
                              "tile_sample_min_size=512, tile_latent_min_size=64) for an SD 1.x VAE")
        return cls(int(values["sample_size"]), int(values["latent_size"]), float(values["overlap_factor"]))

    def with_overrides(self, **overrides) -> "TileConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def blend_v(a: np.ndarray, b: np.ndarray, blend_extent: int) -> np.ndarray:
    """diffusers' ``blend_v``: ramp the top rows of ``b`` from the bottom rows of ``a`` (in place)."""
    blend_extent = min(a.shape[2], b.shape[2], blend_extent)
    for y in range(blend_extent):
        b[:, :, y, :] = a[:, :, -blend_extent + y, :] * (1 - y / blend_extent) + b[:, :, y, :] * (y / blend_extent)
    return b


def blend_h(a: np.ndarray, b: np.ndarray, blend_extent: int) -> np.ndarray:
    """diffusers' ``blend_h``: ramp the left columns of ``b`` from the right columns of ``a`` (in place)."""
    blend_extent = min(a.shape[3], b.shape[3], blend_extent)
    for x in range(blend_extent):
        b[:, :, :, x] = a[:, :, :, -blend_extent + x] * (1 - x / blend_extent) + b[:, :, :, x] * (x / blend_extent)
    return b


def tiled(run: Run, x: np.ndarray, tile_in: int, tile_out: int, overlap_factor: float) -> np.ndarray:
    """The tiling both directions share: ``tile_in``-sided input tiles, ``tile_out``-sided output tiles."""
    step = int(tile_in * (1 - overlap_factor))
    blend_extent = int(tile_out * overlap_factor)
    row_limit = tile_out - blend_extent
    if step < 1:
        raise ValueError(f"a tile of {tile_in} with overlap {overlap_factor} does not advance; use a bigger tile")
    rows = [[np.array(run(x[:, :, i:i + tile_in, j:j + tile_in]), dtype=np.float32)  # a copy we may blend into
             for j in range(0, x.shape[3], step)] for i in range(0, x.shape[2], step)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_v(rows[i - 1][j], tile, blend_extent)
            if j > 0:
                tile = blend_h(row[j - 1], tile, blend_extent)
            out_row.append(tile[:, :, :row_limit, :row_limit])
        out_rows.append(np.concatenate(out_row, axis=3))
    return np.concatenate(out_rows, axis=2)


def tiled_decode(run: Run, z: np.ndarray, cfg: TileConfig) -> np.ndarray:
    """diffusers' ``_decode`` with ``use_tiling``: tiles only when a latent side exceeds the tile."""
    if z.shape[-1] > cfg.latent_size or z.shape[-2] > cfg.latent_size:
        return tiled(run, z, cfg.latent_size, cfg.sample_size, cfg.overlap_factor)
    return np.asarray(run(z), dtype=np.float32)


def tiled_encode(run: Run, x: np.ndarray, cfg: TileConfig) -> np.ndarray:
    """diffusers' ``_encode`` with ``use_tiling``: tiles only when an image side exceeds the tile."""
    if x.shape[-1] > cfg.sample_size or x.shape[-2] > cfg.sample_size:
        return tiled(run, x, cfg.sample_size, cfg.latent_size, cfg.overlap_factor)
    return np.asarray(run(x), dtype=np.float32)


def sliced(run: Run, x: np.ndarray) -> np.ndarray:
    """diffusers' ``use_slicing``: one image of the batch at a time."""
    if x.shape[0] <= 1:
        return np.asarray(run(x), dtype=np.float32)
    return np.concatenate([np.asarray(run(x[k:k + 1]), dtype=np.float32) for k in range(x.shape[0])], axis=0)


@dataclass(frozen=True)
class VaeOptions:
    """How a call runs the VAE: tiled (with these tiles) and/or sliced."""

    tiling: bool = False
    slicing: bool = False
    tiles: TileConfig | None = None  # None: from the bundle's constants when tiling is first used

    def apply(self, run: Run, x: np.ndarray, direction: str, tiles: Callable[[], TileConfig]) -> np.ndarray:
        """Run the decoder (``direction="decode"``) or encoder on ``x`` as these options say; ``tiles``
        gives the tile config when the options carry none."""
        if self.tiling:
            cfg = self.tiles or tiles()
            fn = tiled_decode if direction == "decode" else tiled_encode
            per = lambda a: fn(run, a, cfg)  # noqa: E731
        else:
            per = run
        return sliced(per, x) if self.slicing else np.asarray(per(x), dtype=np.float32)
