"""diffusers' ``StableDiffusionSafetyChecker`` in numpy around one engine (torch-free).

A bundle exported with ``--safety-checker`` carries the checker's CLIP vision model + visual
projection as the ``safety_checker`` component (``pixel_values -> image_embeds``), its concept data
(``safety_checker/concepts.npz``: concept and special-care embeddings and their thresholds) and the
feature extractor's settings (``feature_extractor/preprocessor_config.json``).

What a pipeline call does with it, as diffusers' ``run_safety_checker`` + ``postprocess`` do:
the decoded images become PIL images, CLIP's preprocessing (:mod:`..clip_image`) gives the
checker's ``pixel_values``, the engine gives image embeddings, and per image the cosine similarity to
each special-care embedding minus its threshold (rounded to 3 decimals) turns on an ``adjustment``
of 0.01 once one is positive; then a concept whose rounded score (similarity - threshold +
adjustment) is positive flags the image. Flagged images are replaced by black ones.

The concept file is bundle data and so untrusted: :func:`load_concepts` checks its hash against the
manifest, loads it without pickle and checks the arrays' names, dtypes, shapes and values.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..manifest import REEXPORT_HINT, BundleError
from .clip_image import CLIPImageConfig, clip_preprocess
from .image import postprocess

try:
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

logger = logging.getLogger("latentrt")

COMPONENT = "safety_checker"
CONCEPTS_FILE = "safety_checker/concepts.npz"
FEATURE_EXTRACTOR = "feature_extractor"
#: arrays of the concept file: embeddings (rows, projection_dim) and thresholds (rows,)
CONCEPT_ARRAYS = ("concept_embeds", "concept_embeds_weights", "special_care_embeds", "special_care_embeds_weights")
#: diffusers adds this to every later score of an image once one special-care score is positive
SPECIAL_CARE_ADJUSTMENT = 0.01
#: most concept rows a file may hold (the published checker has 17 + 3)
MAX_CONCEPTS = 4096
NO_CHECKER_HINT = ("re-export it with `latentrt export SRC -o BUNDLE --safety-checker` from a source that carries "
                   "one (SD 1.x checkpoints do), or pass safety_checker=None / False")


class SafetyCheckerError(ValueError):
    """A call asks for a safety checker the bundle does not have, or passes a bad ``safety_checker``."""


@dataclass(frozen=True)
class Concepts:
    concept_embeds: np.ndarray  # (N, D) float32
    concept_weights: np.ndarray  # (N,) float32 thresholds
    special_embeds: np.ndarray  # (M, D)
    special_weights: np.ndarray  # (M,)


def _bad(bundle, why: str) -> BundleError:
    return BundleError(f"{bundle.path}: the safety checker's concept data {CONCEPTS_FILE} {why}; {REEXPORT_HINT} "
                       "--safety-checker")


def load_concepts(bundle, embed_dim: int | None = None) -> Concepts:
    """The bundle's concept data, checked (hash, no pickle, names, dtypes, shapes, finite values)."""
    info = (bundle.manifest.extra.get("safety_checker") or {}).get("concepts")
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
        raise BundleError(f"{bundle.path}: the manifest names no safety-checker concept data; {REEXPORT_HINT} "
                          "--safety-checker")
    path = bundle.file(info.get("path"), "safety-checker concept data")
    if not path.is_file():
        raise _bad(bundle, "is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise _bad(bundle, "does not match the sha256 the manifest records (changed or corrupted)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # not a .npz, truncated, or holding pickled objects
        raise _bad(bundle, f"does not load as a numpy .npz without pickle ({type(e).__name__}: {e})") from None
    if sorted(arrays) != sorted(CONCEPT_ARRAYS):
        raise _bad(bundle, f"holds arrays {sorted(arrays)}; expected exactly {sorted(CONCEPT_ARRAYS)}")
    for k, a in arrays.items():
        if a.dtype.kind != "f":
            raise _bad(bundle, f"has {k} of dtype {a.dtype}; expected floats")
        if not np.isfinite(a).all():
            raise _bad(bundle, f"has NaN or infinite values in {k}")
    out = []
    for emb_name in ("concept_embeds", "special_care_embeds"):
        emb, w = arrays[emb_name], arrays[emb_name + "_weights"]
        if emb.ndim != 2 or emb.shape[0] > MAX_CONCEPTS:
            raise _bad(bundle, f"has {emb_name} of shape {emb.shape}; expected (rows, embedding width) with at most "
                               f"{MAX_CONCEPTS} rows")
        if embed_dim is not None and emb.shape[1] != embed_dim:
            raise _bad(bundle, f"has {emb_name} {emb.shape[1]} wide but the safety_checker component gives "
                               f"{embed_dim}-wide image embeddings")
        if w.shape != (emb.shape[0],):
            raise _bad(bundle, f"has {emb_name}_weights of shape {w.shape}; expected ({emb.shape[0]},), one "
                               f"threshold per row of {emb_name}")
        out += [emb.astype(np.float32), w.astype(np.float32)]
    if out[0].shape[1] != out[2].shape[1]:
        raise _bad(bundle, f"has concept and special-care embeddings of different widths ({out[0].shape[1]} and "
                           f"{out[2].shape[1]})")
    return Concepts(*out)


def _normalize(x: np.ndarray) -> np.ndarray:
    """torch.nn.functional.normalize: x / max(||x||, 1e-12) per row, float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.sum(x * x, axis=1, keepdims=True, dtype=np.float32))
    return x / np.maximum(norm, np.float32(1e-12))


def cosine_distance(image_embeds: np.ndarray, embeds: np.ndarray) -> np.ndarray:
    """diffusers' ``cosine_distance`` (a cosine *similarity*): (B, D) x (N, D) -> (B, N) float32."""
    return (_normalize(image_embeds) @ _normalize(embeds).T).astype(np.float32)


def nsfw_flags(image_embeds: np.ndarray, concepts: Concepts) -> list[bool]:
    """``StableDiffusionSafetyChecker.forward``'s decision per image, score by score: float32
    scores, Python ``round(..., 3)``, the special-care adjustment carried to every later score."""
    special = cosine_distance(image_embeds, concepts.special_embeds)
    cos = cosine_distance(image_embeds, concepts.concept_embeds)
    special_w = [w.item() for w in concepts.special_weights]  # Python floats, as torch's .item()
    concept_w = [w.item() for w in concepts.concept_weights]
    flags = []
    for i in range(special.shape[0]):
        adjustment = 0.0
        for j, threshold in enumerate(special_w):
            if round(special[i][j] - threshold + adjustment, 3) > 0:
                adjustment = SPECIAL_CARE_ADJUSTMENT
        flags.append(any(round(cos[i][j] - threshold + adjustment, 3) > 0 for j, threshold in enumerate(concept_w)))
    return flags


class SafetyChecker:
    """A bundle's checker: settings and concept data read once, the engine from the pipeline."""

    def __init__(self, bundle):
        if not bundle.has(COMPONENT):
            raise SafetyCheckerError(f"{bundle.path}: this bundle has no safety checker; {NO_CHECKER_HINT}")
        entry = bundle.manifest.components[COMPONENT]
        embed_dim = entry.spec.outputs[0].shape[-1]
        self.concepts = load_concepts(bundle, embed_dim if isinstance(embed_dim, int) else None)
        try:
            self.image_config = CLIPImageConfig.from_dir(bundle.file(FEATURE_EXTRACTOR, "feature extractor folder"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BundleError(f"{bundle.path}: the safety checker's {FEATURE_EXTRACTOR}/preprocessor_config.json is "
                              f"missing or unreadable ({e}); {REEXPORT_HINT} --safety-checker") from None

    def __call__(self, pipe, decoded: np.ndarray) -> list[bool]:
        """``decoded``: the VAE's NCHW images in [-1, 1] -> one flag per image."""
        pil = postprocess(decoded, "pil")  # what diffusers hands its feature extractor
        pixels = clip_preprocess(pil, self.image_config)
        embeds = pipe.run_lazy(COMPONENT, pixel_values=pixels)["image_embeds"]
        return nsfw_flags(np.asarray(embeds, dtype=np.float32), self.concepts)


def check_request(pipe, safety_checker: Any) -> None:
    """A call's ``safety_checker``: None (the bundle's checker when it has one), True (required) or
    False (off); checked before any engine runs, as is the bundle's checker data when it will run."""
    if safety_checker is not None and not isinstance(safety_checker, (bool, np.bool_)):
        raise SafetyCheckerError(f"safety_checker must be True, False or None (the bundle's checker if it has one); "
                                 f"got {safety_checker!r}")
    if safety_checker and not pipe.bundle.has(COMPONENT):
        hint = ("diffusers' SDXL pipelines have no safety checker, so SDXL bundles carry none; pass "
                "safety_checker=None / False" if pipe.bundle.manifest.pipeline == "sdxl" else NO_CHECKER_HINT)
        raise SafetyCheckerError(f"safety_checker=True, but {pipe.bundle.path} has no safety checker; {hint}")
    if safety_checker is not False and pipe.bundle.has(COMPONENT):
        checker_for(pipe)  # reads and checks the concept data and settings once


def is_on(pipe, safety_checker: Any) -> bool:
    return pipe.bundle.has(COMPONENT) if safety_checker is None else bool(safety_checker)


def checker_for(pipe) -> SafetyChecker:
    """The pipeline's :class:`SafetyChecker`, created on first use (one per pipeline object)."""
    with pipe._engines_lock:
        checker = getattr(pipe, "_safety_checker", None)
        if checker is None:
            checker = pipe._safety_checker = SafetyChecker(pipe.bundle)
    return checker


def black_out(images: Any, flags: list[bool], output_type: str) -> Any:
    """Flagged images replaced by black ones (diffusers zeroes them and skips their denormalisation)."""
    if not any(flags):
        return images
    logger.warning("Potential NSFW content was detected in one or more images. A black image will be returned "
                   "instead. Try again with a different prompt and/or seed.")
    if output_type == "np":
        images = np.array(images, copy=True)
        images[np.asarray(flags, dtype=bool)] = 0.0
        return images
    return [Image.fromarray(np.zeros_like(np.asarray(im))) if flag else im for im, flag in zip(images, flags)]


def run_checker(pipe, decoded: np.ndarray, images: Any, output_type: str, safety_checker: Any):
    """(images, nsfw_content_detected) after the call's checker: a list of bools when it ran, None
    when it is off or the bundle has none (as diffusers with ``safety_checker=None``)."""
    if output_type == "latent" or not is_on(pipe, safety_checker):
        return images, None
    flags = checker_for(pipe)(pipe, decoded)
    return black_out(images, flags, output_type), flags
