"""latentrt: compile Stable Diffusion-family pipelines into engines and run them torch-free.

``latentrt.load(bundle)`` returns the pipeline a bundle's manifest names. Nothing heavy is imported
here: export-time code lives in :mod:`latentrt.export` (torch, diffusers), the runtime in
:mod:`latentrt.runtime` (numpy + an engine backend).
"""

__version__ = "0.1.0"


def load(bundle, backend: str = "onnxruntime", device: str = "cpu", **options):
    """Load a bundle and return its pipeline (class chosen by the manifest). See :func:`latentrt.runtime.load`."""
    from .runtime.loader import load as _load

    return _load(bundle, backend=backend, device=device, **options)


__all__ = ["__version__", "load"]
