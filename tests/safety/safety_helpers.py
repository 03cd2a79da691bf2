"""Helpers of the safety-checker tests: a tiny random ``StableDiffusionSafetyChecker`` and concept data
aimed at given images (one flagged, one not)."""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32  # the tiny checker's CLIP vision input (and the feature extractor's crop)
PROJECTION_DIM = 16
N_CONCEPTS, N_SPECIAL = 17, 3  # as diffusers' checker
NEVER = 2.0  # a threshold no cosine similarity reaches

CALL = dict(prompt=["a red cat", "a blue dog on a hill"], num_inference_steps=2, output_type="np")
SEED = 0


def photo():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(7).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def call_of(kind: str) -> dict:
    """The call every test of ``kind`` makes (``lcm-img2img``: image-to-image from :func:`photo`)."""
    return {**CALL, "image": photo(), "strength": 0.7} if kind.endswith("img2img") else dict(CALL)


def tiny_checker(seed: int = 7):
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=99),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=PROJECTION_DIM)
    checker = StableDiffusionSafetyChecker(config).eval()
    fe = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return checker, fe


def aimed_concepts(flag: np.ndarray, keep: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Concept data that flags the image with embedding ``flag`` and not the one with ``keep``: concept
    0 is ``flag``'s part orthogonal to ``keep`` (similarity 0 to ``keep``), its threshold half of
    ``flag``'s similarity; every other threshold is out of reach."""
    rng = np.random.default_rng(seed)
    k = keep / np.linalg.norm(keep)
    c = flag - (flag @ k) * k
    sim = float((flag @ c) / (np.linalg.norm(flag) * np.linalg.norm(c)))
    assert sim > 0.02, f"the two images' embeddings are too alike (similarity to the concept {sim:.3g})"
    concepts = rng.standard_normal((N_CONCEPTS, flag.shape[0])).astype(np.float32)
    concepts[0] = c
    weights = np.full(N_CONCEPTS, NEVER, np.float32)
    weights[0] = sim / 2
    special = rng.standard_normal((N_SPECIAL, flag.shape[0])).astype(np.float32)
    return {"concept_embeds": concepts, "concept_embeds_weights": weights, "special_care_embeds": special,
            "special_care_embeds_weights": np.full(N_SPECIAL, NEVER, np.float32)}


def set_concepts(checker, arrays: dict[str, np.ndarray]) -> None:
    import torch

    with torch.no_grad():
        for name, value in arrays.items():
            setattr(checker, name, torch.nn.Parameter(torch.from_numpy(np.array(value)), requires_grad=False))


def torch_embeds(checker, fe, images_np: np.ndarray) -> np.ndarray:
    """The checker's image embeddings of NHWC [0, 1] images, as diffusers computes them."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    pil = VaeImageProcessor.numpy_to_pil(images_np)
    pixels = fe(pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        return checker.visual_projection(checker.vision_model(pixels)[1]).numpy()
