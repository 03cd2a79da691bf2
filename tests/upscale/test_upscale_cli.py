"""``latentrt upscale`` and ``latentrt generate --upscale`` through a subprocess, as users run them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "latentrt.cli", *map(str, args)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                       timeout=600)
    if check:
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_upscale_command(upscaler_bundle, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out"
    r = cli("upscale", upscaler_bundle, src, "--prompt", "a red cat", "--steps", "2", "--guidance", "5",
            "--negative-prompt", "blurry", "-o", out, "--no-progress")
    assert "unet" in r.stdout and "total" in r.stdout
    [png] = sorted(out.glob("upscaled-*.png"))
    with Image.open(png) as img:
        assert img.size == (192, 128)
        meta = json.loads(img.text["latentrt"])
    assert meta["prompt"] == "a red cat" and meta["num_inference_steps"] == 2 and meta["negative_prompt"] == "blurry"


def test_upscale_command_errors(upscaler_bundle, lcm_bundle, tmp_path):
    src = tmp_path / "odd.png"
    Image.new("RGB", (72, 64)).save(src)
    r = cli("upscale", upscaler_bundle, src, "--steps", "1", "-o", tmp_path / "o", "--no-progress", check=False)
    assert r.returncode == 2 and "multiples of size_multiple=32" in r.stderr and "Traceback" not in r.stderr
    r = cli("upscale", lcm_bundle, src, "-o", tmp_path / "o", check=False)
    assert r.returncode == 2 and "not a latent upscaler" in r.stderr


def test_generate_with_upscale(lcm_bundle, upscaler_bundle, tmp_path):
    out = tmp_path / "out"
    r = cli("generate", lcm_bundle, "a red cat", "--steps", "2", "--height", "64", "--width", "96",
            "--upscale", upscaler_bundle, "--upscale-steps", "2", "--upscale-guidance", "0", "-o", out,
            "--no-progress")
    assert "upscale.unet" in r.stdout
    [png] = sorted(out.glob("*.png"))
    with Image.open(png) as img:
        assert img.size == (192, 128)
