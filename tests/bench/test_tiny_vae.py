"""TAESD (AutoencoderTiny) as an alternative VAE: export, per-call selection, parity with diffusers.

The reference is diffusers' LCM pipeline built with ``vae=AutoencoderTiny`` on the same weights and
noise (diffusers divides the latents by ``vae.config.scaling_factor`` and TAESD's encoder draws no
noise, which the runtime must reproduce).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import latentrt
from latentrt.runtime.random import TorchGeneratorNoise

FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def ref_pipes(tiny_lcm_pipe, taesd_dir):
    from diffusers import AutoencoderTiny, LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline

    taesd = AutoencoderTiny.from_pretrained(str(taesd_dir)).float().eval()
    comps = {**tiny_lcm_pipe.components, "vae": taesd}
    t2i, i2i = LatentConsistencyModelPipeline(**comps), LatentConsistencyModelImg2ImgPipeline(**comps)
    for p in (t2i, i2i):
        p.set_progress_bar_config(disable=True)
    return t2i, i2i


@pytest.fixture(scope="module")
def ours(taesd_bundle):
    return latentrt.load(taesd_bundle)


def _close(got, want):
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= FP32_TOL, f"max abs image difference {err:.3g} > {FP32_TOL}"
    assert float(want.std()) > 1e-2  # not trivially constant


def test_manifest_records_tiny_vae(taesd_bundle):
    m = json.loads((taesd_bundle / "latentrt.json").read_text())
    assert {"tiny_vae_decoder", "tiny_vae_encoder"} <= set(m["components"])
    assert m["constants"]["tiny_vae_scaling_factor"] == 1.0
    assert m["extra"]["tiny_vae"]["class"] == "AutoencoderTiny"


@pytest.mark.parametrize("kw", [dict(num_inference_steps=4), dict(num_inference_steps=2, height=64, width=96)],
                         ids=["4-steps", "non-square"])
def test_txt2img_parity_taesd(kw, ref_pipes, ours):
    prompt = "a photograph of an astronaut riding a horse"
    want = ref_pipes[0](prompt, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    got = ours(prompt, generator=TorchGeneratorNoise(3), output_type="np", vae="tiny", **kw).images
    _close(got, want)
    full = ours(prompt, generator=TorchGeneratorNoise(3), output_type="np", **kw).images
    assert float(np.abs(full - got).max()) > 1e-2  # the choice really changes the decoder


def test_img2img_parity_taesd(ref_pipes, ours, rgb_image):
    kw = dict(image=rgb_image, strength=0.6, num_inference_steps=4)
    want = ref_pipes[1]("a cat", generator=torch.Generator().manual_seed(5), output_type="np", **kw).images
    got = ours("a cat", generator=TorchGeneratorNoise(5), output_type="np", vae="tiny", **kw).images
    _close(got, want)


def test_tiny_engines_are_lazy_and_timed(ours):
    pipe = latentrt.load(ours.bundle.path)
    assert "tiny_vae_decoder" not in pipe.engines
    out = pipe("a cat", num_inference_steps=1, generator=0, output_type="np", vae="tiny")
    assert "tiny_vae_decoder" in out.timings and "vae_decoder" not in out.timings
    out = pipe("a cat", num_inference_steps=1, generator=0, output_type="np")  # default is back to the full VAE
    assert "vae_decoder" in out.timings and "tiny_vae_decoder" not in out.timings


def test_bad_vae_choice(ours, no_taesd_bundle):
    with pytest.raises(ValueError, match="vae must be 'full' or 'tiny'"):
        ours("a cat", num_inference_steps=1, vae="taesd")
    plain = latentrt.load(no_taesd_bundle)
    with pytest.raises(ValueError, match="lacks.*--tiny-vae"):
        plain("a cat", num_inference_steps=1, vae="tiny")


def test_mismatched_tiny_vae_is_refused(tiny_lcm_dir, tmp_path):
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import tiny_taesd

    bad = tiny_taesd(latent_channels=16)
    with pytest.raises(ValueError, match="16 latent channels"):
        export_bundle(tiny_lcm_dir, tmp_path / "b", tiny_vae=bad, check=False, progress=lambda *_: None)
    assert not (tmp_path / "b").exists()


def test_generate_cli_tiny_vae(taesd_bundle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "latentrt.cli", "generate", str(taesd_bundle), "a cat", "--steps", "1",
                        "--tiny-vae", "--no-progress", "-o", str(tmp_path)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tiny_vae_decoder" in r.stdout and list(tmp_path.glob("*.png"))
