"""VAE tiling and slicing (issue 17 item 1): diffusers' tiled_decode / _tiled_encode and use_slicing,
on the tiny SD VAE with its tiles lowered (32 px / 4 latents, overlap 0.25) so that a 96x128 image
needs 4 x 6 overlapping tiles; fp32, max abs difference at most 1e-4."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import latentrt
from latentrt.manifest import BundleError
from latentrt.runtime.random import TorchGeneratorNoise

TOL = 1e-4
TILES = dict(tile_sample_min_size=32, tile_latent_min_size=4, tile_overlap_factor=0.25)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import tiny_sd_pipeline

    ref = tiny_sd_pipeline(0)
    ref.set_progress_bar_config(disable=True)
    out = tmp_path_factory.mktemp("bundles") / "sd"
    export_bundle(None, out, pipe=ref, check=False, progress=lambda *_: None)
    return ref, out


@pytest.fixture
def tiled_ref(sd):
    """The reference VAE with diffusers' tiling on and the lowered tiles (restored afterwards)."""
    vae = sd[0].vae
    saved = {k: getattr(vae, k) for k in TILES}
    for k, v in TILES.items():
        setattr(vae, k, v)
    vae.enable_tiling()
    yield sd[0]
    vae.disable_tiling()
    for k, v in saved.items():
        setattr(vae, k, v)


def _latents(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_export_records_the_vae_config_tiles(sd):
    k = latentrt.load(sd[1]).constants
    assert (k["vae_tile_sample_min_size"], k["vae_tile_latent_min_size"], k["vae_tile_overlap_factor"]) == (64, 8, 0.25)


def test_tiled_decode_and_encode_match_diffusers(sd, tiled_ref):
    ours = latentrt.load(sd[1])
    ours.enable_vae_tiling(**TILES)
    ours.start_call()
    z = _latents((1, 4, 12, 16))
    with torch.no_grad():
        want = tiled_ref.vae.decode(torch.from_numpy(z)).sample.numpy()
        untiled = tiled_ref.vae.decoder(tiled_ref.vae.post_quant_conv(torch.from_numpy(z))).numpy()
    got = ours.run_vae("vae_decoder", z, "decode", "latent_sample", "sample")
    assert got.shape == want.shape == (1, 3, 96, 128)
    assert float(np.abs(got - want).max()) <= TOL
    assert float(np.abs(want - untiled).max()) > 1e-2  # the tiles really change the image

    x = np.clip(_latents((1, 3, 96, 128), 1), -1, 1)
    with torch.no_grad():
        want = tiled_ref.vae._encode(torch.from_numpy(x)).numpy()
    got = ours.run_vae("vae_encoder", x, "encode", "sample", "latent_parameters")
    assert got.shape == want.shape == (1, 8, 12, 16)
    assert float(np.abs(got - want).max()) <= TOL


def test_img2img_with_vae_tiling_matches_diffusers(sd, tiled_ref, rgb_image):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline(**tiled_ref.components)
    ref.set_progress_bar_config(disable=True)
    image = rgb_image.resize((128, 96))
    kw = dict(prompt="a red cat", image=image, strength=0.6, num_inference_steps=4, output_type="np")
    want = ref(generator=torch.Generator().manual_seed(3), **kw).images
    ours = latentrt.load(sd[1])
    ours.enable_vae_tiling(**TILES)
    got = ours(generator=TorchGeneratorNoise(3), **kw).images
    assert float(np.abs(got - want).max()) <= TOL
    # the per-call argument overrides the default
    plain = ours(generator=TorchGeneratorNoise(3), vae_tiling=False, **kw).images
    assert float(np.abs(plain - got).max()) > 1e-3


def test_slicing_decodes_one_image_at_a_time(sd):
    ours = latentrt.load(sd[1])
    z = _latents((3, 4, 8, 8), 2)
    ours.start_call()
    whole = ours.decode(z)
    calls = []
    ours.engines["vae_decoder"] = _counting(ours.engines["vae_decoder"], calls)
    ours.enable_vae_slicing()
    ours.start_call()
    assert float(np.abs(ours.decode(z) - whole).max()) <= TOL
    assert calls == [1, 1, 1]


class _counting:
    """The engine, recording the batch size of each call (its specs stay visible to the runtime's checks)."""

    def __init__(self, engine, calls):
        self.engine, self.calls = engine, calls

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, **inputs):
        self.calls.append(next(iter(inputs.values())).shape[0])
        return self.engine(**inputs)


def test_concurrent_calls_keep_their_own_choice(sd):
    ours = latentrt.load(sd[1])
    ours.vae_defaults = ours.vae_defaults.__class__(tiles=ours.tile_config(sample_size=32, latent_size=4))
    z = _latents((1, 4, 12, 16), 3)
    want = {}
    for tiling in (True, False):
        ours.set_vae_options(tiling)
        want[tiling] = ours.decode(z)
    assert float(np.abs(want[True] - want[False]).max()) > 1e-2
    got, barrier = {}, threading.Barrier(2)

    def worker(tiling):
        ours.set_vae_options(tiling)
        barrier.wait()  # both threads have set their option before either decodes
        got[tiling] = ours.decode(z)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tiling in (True, False):
        assert np.array_equal(got[tiling], want[tiling])


def test_bad_input(sd):
    ours = latentrt.load(sd[1])
    with pytest.raises(ValueError, match="TAESD"):
        ours("a cat", vae="tiny", vae_tiling=True, num_inference_steps=1)
    with pytest.raises(TypeError, match="vae_tiling"):
        ours("a cat", vae_tiling="yes", num_inference_steps=1)
    # a bundle exported before tiling: no tile sizes in its constants
    ours.constants = {k: v for k, v in ours.constants.items() if not k.startswith("vae_tile")}
    with pytest.raises(BundleError, match="tile_sample_min_size"):
        ours.enable_vae_tiling()
    with pytest.raises(BundleError, match="re-export"):
        ours("a cat", vae_tiling=True, num_inference_steps=1)
    ours.enable_vae_tiling(tile_sample_min_size=32, tile_latent_min_size=4)  # sizes given: fine
    assert ours("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images.shape == (1, 64, 64, 3)


def test_cli_vae_tiling(sd, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    def generate(out, *extra):
        subprocess.run([sys.executable, "-m", "latentrt.cli", "generate", str(sd[1]), "a cat", "--steps", "1",
                        "--height", "128", "--width", "128", "--no-progress", "-o", str(out), *extra],
                       check=True, capture_output=True, timeout=300)
        return np.asarray(Image.open(next(out.glob("*.png"))), np.float32) / 255

    tiled = generate(tmp_path / "tiled", "--vae-tiling")
    ours = latentrt.load(sd[1])
    want = ours("a cat", num_inference_steps=1, height=128, width=128, generator=0, vae_tiling=True,
                output_type="np").images[0]
    assert float(np.abs(tiled - want).max()) <= 1 / 255 + 1e-6  # the PNG's 8-bit rounding
    assert float(np.abs(generate(tmp_path / "plain") - tiled).max()) > 1 / 255


def test_upscaler_tiles_big_outputs_by_itself(tmp_path, monkeypatch):
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import tiny_upscaler_pipeline
    from latentrt.runtime.pipelines import upscale

    export_bundle(None, tmp_path / "up", pipe=tiny_upscaler_pipeline(0), check=False, progress=lambda *_: None)
    ours = latentrt.load(tmp_path / "up")
    low = _latents((1, 4, 8, 8), 4)  # -> 16x16 output latents: 128x128 pixels, tiles of 64
    kw = dict(image=low, prompt="a cat", num_inference_steps=2, generator=0, output_type="np")
    untiled = ours(**kw).images  # 128x128 is far below AUTO_TILING_PIXELS
    tiled = ours(vae_tiling=True, **kw).images
    assert float(np.abs(tiled - untiled).max()) > 1e-3
    monkeypatch.setattr(upscale, "AUTO_TILING_PIXELS", 64 * 64)
    assert np.array_equal(ours(**kw).images, tiled)
    assert np.array_equal(ours(vae_tiling=False, **kw).images, untiled)  # the call's choice wins
