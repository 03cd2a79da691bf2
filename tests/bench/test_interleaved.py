"""The interleaved A/B timer of the UNet-step scripts: order rotation, warm-up, medians."""

from __future__ import annotations

import pytest

from latentrt.bench.interleaved import interleaved


def test_rounds_rotate_the_order_and_warmup_is_untimed():
    seen = []
    calls = {v: (lambda v=v: seen.append(v)) for v in ("a", "b", "c")}
    res = interleaved(calls, rounds=3, warmup=1, progress=lambda *_: None)
    assert seen == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {v: len(t) for v, t in res["times_s"].items()} == {"a": 3, "b": 3, "c": 3}
    assert all(res["min_s"][v] <= res["median_s"][v] for v in calls)


def test_needs_a_variant_and_a_round():
    with pytest.raises(ValueError, match="at least one variant"):
        interleaved({}, rounds=1)
    with pytest.raises(ValueError, match="one round"):
        interleaved({"a": lambda: None}, rounds=0)
