"""Bad input gets a clear error that names the problem and the fix (never a deep ORT traceback)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import latentrt
from latentrt.manifest import MANIFEST_NAME, BundleError
from latentrt.runtime.image import ImageInputError


@pytest.fixture(scope="module")
def pipe(lcm_bundle):
    return latentrt.load(lcm_bundle)


@pytest.fixture
def bundle_copy(lcm_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(lcm_bundle, dst, ignore=shutil.ignore_patterns(".cache"))
    return dst


# -- bundles ------------------------------------------------------------------------------------

def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"no such bundle directory.*latentrt export"):
        latentrt.load(tmp_path / "nope")


def test_folder_without_manifest(tmp_path):
    with pytest.raises(BundleError, match=r"latentrt\.json is missing.*re-export"):
        latentrt.load(tmp_path)


def test_incomplete_bundle(bundle_copy):
    (bundle_copy / "unet" / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"component 'unet' is incomplete: unet/model.onnx is missing.*re-export"):
        latentrt.load(bundle_copy)


def test_unknown_schema_version(bundle_copy):
    path = bundle_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"schema version 99 is not supported.*reads version 1.*re-export"):
        latentrt.load(bundle_copy)


def test_unreadable_manifest(bundle_copy):
    (bundle_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        latentrt.load(bundle_copy)


def test_corrupted_model_same_size(bundle_copy):
    path = bundle_copy / "vae_decoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vae_decoder/model.onnx is corrupted \(sha256.*re-export"):
        latentrt.load(bundle_copy)


def test_truncated_model(bundle_copy):
    path = bundle_copy / "text_encoder" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"text_encoder/model.onnx is corrupted \(size 1000"):
        latentrt.load(bundle_copy)


def test_corruption_after_a_verified_load_is_caught(bundle_copy):
    latentrt.load(bundle_copy)  # hashes remembered in the bundle cache
    path = bundle_copy / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))  # new mtime: the remembered hash no longer applies
    with pytest.raises(BundleError, match="corrupted"):
        latentrt.load(bundle_copy)


def test_unverified_corrupt_model_still_gets_a_clear_error(bundle_copy):
    path = bundle_copy / "unet" / "model.onnx"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(RuntimeError, match=r"unet: ONNX Runtime could not load .*re-export"):
        latentrt.load(bundle_copy, verify=False)


# -- call arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, pattern", [
    (dict(height=60), r"height=60 is not a multiple of 8; use 56 or 64"),
    (dict(width=100), r"width=100 is not a multiple of 8; use 96 or 104"),
    (dict(height=4096), r"height=4096 px is above the sizes this bundle supports \(16 to 256 px per side in "
                        r"multiples of 8\); use 256; re-export with `latentrt export --max-size N`"),
    (dict(width=8), r"width=8 px is below the sizes this bundle supports \(16 to 256 px .*\); use 16$"),
    (dict(num_images_per_prompt=17), r"this call makes 17 images .* more than the 16 this bundle supports"),
    (dict(num_inference_steps=0), r"num_inference_steps must be an integer >= 1"),
    (dict(num_inference_steps=60), r"original_inference_steps|num_inference_steps"),
    (dict(num_inference_steps=8, original_inference_steps=4), r"original_inference_steps"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt must be a positive integer"),
    (dict(output_type="tensor"), r"output_type must be 'pil', 'np' or 'latent'"),
    (dict(clip_skip=7), r"clip_skip must be in \[0, 2\]"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), r"latents have shape \(1, 4, 4, 4\); expected \(1, 4, 8, 8\)"),
    (dict(generator=-1), r"an int seed \(generator=\) must be >= 0; got -1"),
    (dict(generator=[0, np.int64(-3)]), r"must be >= 0; got -3"),
])
def test_bad_arguments(pipe, kw, pattern):
    kw = {"prompt": "a cat", "output_type": "np", **kw}
    with pytest.raises(ValueError, match=pattern):
        pipe(**kw)


def test_steps_above_original_inference_steps_message(pipe):
    with pytest.raises(ValueError) as e:
        pipe("a cat", num_inference_steps=51)
    assert "original_inference_steps" in str(e.value) and "50" in str(e.value)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_strength_outside_range(pipe, rgb_image, strength):
    with pytest.raises(ValueError, match=r"strength must be in the range \(0, 1\]"):
        pipe("a cat", image=rgb_image, strength=strength)


def test_neither_prompt_nor_embeds(pipe):
    with pytest.raises(ValueError, match="pass a prompt .* or prompt_embeds"):
        pipe(num_inference_steps=1)


def test_both_prompt_and_embeds(pipe):
    with pytest.raises(ValueError, match="either prompt or prompt_embeds, not both"):
        pipe("a cat", prompt_embeds=np.zeros((1, 77, 32), np.float32))


def test_prompt_of_wrong_type(pipe):
    with pytest.raises(TypeError, match="prompt must be a str or a non-empty list of str"):
        pipe(123)


def test_prompt_embeds_of_wrong_width(pipe):
    with pytest.raises(ValueError, match=r"encoder_hidden_states.*expected"):
        pipe(prompt_embeds=np.zeros((1, 77, 16), np.float32), num_inference_steps=1)


# -- images -------------------------------------------------------------------------------------

def test_rgba_and_grayscale_images_are_converted(pipe, rgb_image):
    rgba = rgb_image.convert("RGBA")
    gray = rgb_image.convert("L")
    base = pipe("a cat", image=rgb_image, num_inference_steps=2, generator=0, output_type="np").images
    out_rgba = pipe("a cat", image=rgba, num_inference_steps=2, generator=0, output_type="np").images
    out_gray = pipe("a cat", image=gray, num_inference_steps=2, generator=0, output_type="np").images
    assert np.array_equal(base, out_rgba)  # alpha dropped, not mistaken for latents
    assert out_gray.shape == base.shape


def test_uint8_and_float_arrays_are_the_same_image(pipe, rgb_image):
    u8 = np.asarray(rgb_image)
    a = pipe("a cat", image=u8, num_inference_steps=2, generator=0, output_type="np").images
    b = pipe("a cat", image=u8.astype(np.float32) / 255, num_inference_steps=2, generator=0, output_type="np").images
    assert np.abs(a - b).max() < 1e-5


@pytest.mark.parametrize("image, pattern", [
    (np.zeros((64, 64, 3), np.int32), r"dtype int32; pass uint8 \(0-255\) or float \(0-1\)"),
    (np.zeros((64, 64, 2), np.float32), r"2 channels .* expected 1 \(gray\), 3 \(RGB\) or 4 \(RGBA\)"),
    (np.full((64, 64, 3), 2.0, np.float32), r"float images must be in \[0, 1\]"),
    (np.zeros((60, 64, 3), np.float32), r"60x64 .* not a multiple of 8"),
    ("cat.png", r"image must be a PIL image, a numpy array or a list"),
])
def test_bad_images(pipe, image, pattern):
    with pytest.raises(ImageInputError, match=pattern):
        pipe("a cat", image=image, num_inference_steps=1)


def test_image_size_not_supported_by_the_bundle(pipe):
    with pytest.raises(ValueError, match=r"height=264 px is above the sizes this bundle supports \(16 to 256 px"):
        pipe("a cat", image=np.zeros((264, 64, 3), np.float32), num_inference_steps=1)
