"""CI smoke run of the load generator (benchmarks/serve_load.py) on the tiny LCM bundle: every
response checked against the library, batching on and off, 429s counted under overload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "serve_load.py"


def test_load_generator_smoke(lcm_bundle, tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(lcm_bundle), "--size", "64x64", "--steps", "2",
                        "--requests", "8", "--concurrency", "1,4", "--batching", "on,off", "--max-batch", "2", "--max-queue", "2",
                        "--max-retry-wait-s", "0.2", "--threads", "1", "--verify", "--json", str(out)],
                       capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    assert [(row["batching"], row["concurrency"]) for row in rows] == [("on", 1), ("on", 4), ("off", 1), ("off", 4)]
    for row in rows:
        assert row["ok"] == row["requests"] == 8 and not row["problems"]
        assert row["images_per_minute"] > 0 and row["p99_s"] >= row["p50_s"] > 0
    assert max(row["mean_batch_images"] for row in rows if row["batching"] == "on") > 1  # batches formed
    assert all(row["mean_batch_images"] == 1 for row in rows if row["batching"] == "off")
    assert sum(row["status_429"] for row in rows if row["concurrency"] == 4) >= 1  # a queue of 2 overflows
    assert "| batching | concurrency |" in r.stdout
