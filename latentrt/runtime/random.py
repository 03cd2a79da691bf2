"""The randomness contract.

Every random draw of a pipeline goes through one object with numpy Generator's
``standard_normal(size, dtype)`` method, in the same order and shapes as the diffusers reference
pipeline draws them. So a seed gives the same images on every backend, and
:class:`TorchGeneratorNoise` (a thin adapter over ``torch.Generator``) reproduces diffusers' own
noise, which is how the parity tests compare images.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class NoiseSource(Protocol):
    def standard_normal(self, size, dtype=np.float32) -> np.ndarray: ...


class TorchGeneratorNoise:
    """Draws as ``torch.randn(size, generator=g)`` does (CPU), returned as numpy.

    Wrap a ``torch.Generator`` to get the very noise diffusers draws with it. torch is imported
    only when this class is used.
    """

    def __init__(self, generator_or_seed: Any = 0):
        import torch

        if isinstance(generator_or_seed, torch.Generator):
            self.generator = generator_or_seed
        else:
            self.generator = torch.Generator("cpu").manual_seed(int(generator_or_seed))

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        import torch

        tdtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np.dtype(dtype)]
        return torch.randn(tuple(size), generator=self.generator, dtype=tdtype).numpy()


class PerSampleNoise:
    """A list of sources, one per batch element (diffusers' list-of-generators form)."""

    def __init__(self, sources: Sequence[NoiseSource]):
        self.sources = list(sources)

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        size = tuple(size)
        if size[0] != len(self.sources):
            raise ValueError(
                f"a list of {len(self.sources)} generators was given for a batch of {size[0]}; "
                "pass one generator per image (batch size x num_images_per_prompt) or a single one"
            )
        return np.concatenate([s.standard_normal((1,) + size[1:], dtype) for s in self.sources], axis=0)


def as_noise_source(generator: Any = None) -> NoiseSource:
    """Normalise the ``generator`` argument of a pipeline call.

    ``None`` (fresh entropy), an int seed, a ``numpy.random.Generator``, a ``torch.Generator``, any
    object with ``standard_normal(size, dtype)``, or a list of those (one per image).
    """
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        if generator < 0:  # numpy's SeedSequence takes non-negative integers only
            raise ValueError(f"an int seed (generator=) must be >= 0; got {int(generator)} (use None for a random seed)")
        return np.random.default_rng(int(generator))
    if isinstance(generator, (list, tuple)):
        return PerSampleNoise([as_noise_source(g) for g in generator])
    if isinstance(generator, NoiseSource):
        return generator
    if type(generator).__module__.startswith("torch") and type(generator).__name__ == "Generator":
        return TorchGeneratorNoise(generator)
    raise TypeError(
        f"generator must be None, an int seed, a numpy Generator, a torch.Generator or an object with "
        f"standard_normal(size, dtype); got {type(generator).__name__}"
    )


def randn(source: NoiseSource, shape, dtype=np.float32) -> np.ndarray:
    out = np.asarray(source.standard_normal(tuple(int(s) for s in shape), dtype=dtype))
    return out.astype(dtype, copy=False)
