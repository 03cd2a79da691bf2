"""Every committed benchmark scenario file parses (the commands in benchmarks/RESULTS.md run them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentrt.bench.scenarios import load_scenarios

FILES = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios").glob("*.toml"))


def test_there_are_scenario_files():
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_scenario_file_parses(path):
    scenarios = load_scenarios(str(path))
    assert scenarios and all(s.name for s in scenarios)
    names = [s.name for s in scenarios]
    assert len(names) == len(set(names)), f"{path.name}: scenario names repeat"
    for s in scenarios:
        method = (s.engine_options or {}).get("int8_method")
        assert method in (None, "full", "hybrid"), f"{path.name}: int8_method {method!r}"
