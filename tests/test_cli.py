"""The CLI through a subprocess, as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def cli(*args, cwd=None, check=True):
    r = subprocess.run([sys.executable, "-m", "latentrt.cli", *map(str, args)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                       cwd=cwd, timeout=600)
    if check:
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_help_lists_subcommands():
    out = cli("--help").stdout
    for name in ("export", "generate", "info", "demo"):
        assert name in out


def test_export_info_generate(tiny_lcm_dir, tmp_path):
    bundle = tmp_path / "bundle"
    r = cli("export", tiny_lcm_dir, "-o", bundle)
    assert "unet: max abs error vs torch" in r.stdout
    info = cli("info", bundle, "--verify").stdout
    assert "pipeline   lcm" in info and "timestep_cond" in info and "all files match their sha256" in info
    assert json.loads(cli("info", bundle, "--json").stdout)["pipeline"] == "lcm"

    out = tmp_path / "out"
    r = cli("generate", bundle, "a red cat", "--steps", "2", "--seed", "3", "--num-images", "2", "-o", out,
            "--no-progress")
    assert "unet" in r.stdout and "total" in r.stdout
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    meta = json.loads(Image.open(pngs[0]).text["latentrt"])
    assert meta["prompt"] == "a red cat" and meta["seed"] == 3 and meta["num_inference_steps"] == 2

    # image-to-image from the first output
    r = cli("generate", bundle, "a red cat", "--image", pngs[0], "--strength", "0.5", "--steps", "4",
            "-o", tmp_path / "i2i")
    assert len(list((tmp_path / "i2i").glob("*.png"))) == 1

    # the same seed gives the same image
    cli("generate", bundle, "a red cat", "--steps", "2", "--seed", "3", "--num-images", "2", "-o", tmp_path / "again",
        "--no-progress")
    again = sorted((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(pngs[0])), np.asarray(Image.open(again[0])))


def test_errors_are_one_line_without_traceback(tmp_path, lcm_bundle):
    r = cli("generate", tmp_path / "missing", "a cat", check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr and "latentrt export" in r.stderr
    r = cli("generate", lcm_bundle, "a cat", "--height", "100", "-o", tmp_path, check=False)
    assert r.returncode == 2 and "not a multiple of 8" in r.stderr and "Traceback" not in r.stderr
    r = cli("export", tmp_path / "nope", "-o", tmp_path / "b", check=False)
    assert r.returncode == 2 and "no such folder" in r.stderr


@pytest.mark.slow
def test_demo(tmp_path):
    r = cli("demo", "-o", tmp_path / "demo")
    assert "text_encoder" in r.stdout and "vae_decoder" in r.stdout and "total" in r.stdout
    assert (tmp_path / "demo" / "demo-0-0.png").is_file()
