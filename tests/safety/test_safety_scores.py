"""The checker's decision (cosine similarities, thresholds, 3-decimal rounding, the special-care
adjustment of 0.01) against diffusers' ``StableDiffusionSafetyChecker.forward`` on many embeddings."""

from __future__ import annotations

import numpy as np
import torch

from latentrt.runtime.safety import Concepts, cosine_distance, nsfw_flags

from safety_helpers import N_CONCEPTS, N_SPECIAL, NEVER, PROJECTION_DIM, set_concepts, tiny_checker


class _Embeds(torch.nn.Module):
    """Stands in for the vision model: its 'pooled output' is the input (the projection is made identity)."""

    def forward(self, x):
        return (x, x)


def _diffusers_flags(checker, embeds: np.ndarray, arrays: dict) -> list[bool]:
    set_concepts(checker, arrays)
    checker.vision_model = _Embeds()
    checker.visual_projection = torch.nn.Identity()
    images = torch.ones(len(embeds), 3, 4, 4)
    _, flags = checker(clip_input=torch.from_numpy(embeds), images=images)
    return list(flags)


def _concepts(arrays) -> Concepts:
    return Concepts(arrays["concept_embeds"], arrays["concept_embeds_weights"], arrays["special_care_embeds"],
                    arrays["special_care_embeds_weights"])


def test_cosine_distance_matches_torch():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 16)).astype(np.float32), rng.standard_normal((7, 16)).astype(np.float32)
    want = torch.mm(torch.nn.functional.normalize(torch.from_numpy(a)),
                    torch.nn.functional.normalize(torch.from_numpy(b)).t()).numpy()
    np.testing.assert_allclose(cosine_distance(a, b), want, atol=1e-6)


def test_flags_match_diffusers_with_special_care_adjustment():
    rng = np.random.default_rng(0)
    n = 256
    embeds = rng.standard_normal((n, PROJECTION_DIM)).astype(np.float32)
    concepts = rng.standard_normal((N_CONCEPTS, PROJECTION_DIM)).astype(np.float32)
    special = rng.standard_normal((N_SPECIAL, PROJECTION_DIM)).astype(np.float32)
    cos, scos = cosine_distance(embeds, concepts), cosine_distance(embeds, special)
    # thresholds near the scores' upper tail: some images flagged outright, some only with the adjustment
    # (a best score within 0.01 below its threshold), some special-care hits
    weights = (np.quantile(cos, 0.97, axis=0) + 0.004).astype(np.float32)
    special_w = np.quantile(scos, 0.7, axis=0).astype(np.float32)
    arrays = {"concept_embeds": concepts, "concept_embeds_weights": weights, "special_care_embeds": special,
              "special_care_embeds_weights": special_w}
    checker, _ = tiny_checker()
    want = _diffusers_flags(checker, embeds, arrays)
    got = nsfw_flags(embeds, _concepts(arrays))
    assert got == want
    # the case covers every branch: flagged and not, and flags that only the adjustment makes
    no_special = nsfw_flags(embeds, _concepts({**arrays, "special_care_embeds_weights": np.full(N_SPECIAL, NEVER,
                                                                                            np.float32)}))
    assert 0 < sum(got) < n
    assert sum(got) > sum(no_special) and all(a or not b for a, b in zip(got, no_special))
