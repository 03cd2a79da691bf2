"""The openvino backend (CPU fast path) against onnxruntime on the tiny LCM bundle.

fp32 mode: the same image within 1e-4 (max abs, 0-1 images). bf16 mode: bf16 keeps 8 bits of
mantissa, so the image is checked for finiteness and a PSNR of at least 30 dB against the fp32
onnxruntime image (the bar the CPU fast path must meet on full-size models too).
"""

from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")

import latentrt  # noqa: E402
from latentrt.runtime.bundle import Bundle  # noqa: E402
from latentrt.runtime.engines.openvino import ENV_PRECISION  # noqa: E402

FP32_TOL = 1e-4
MIN_PSNR_DB = 30.0
CALL = dict(prompt="a photograph of an astronaut riding a horse", num_inference_steps=4, output_type="np")


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of 0-1 images (peak 1)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def _has_bf16() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def reference(lcm_bundle):
    return latentrt.load(lcm_bundle)(**CALL, generator=0).images


def test_fp32_matches_onnxruntime(lcm_bundle, reference):
    pipe = latentrt.load(lcm_bundle, backend="openvino", precision="fp32")
    assert {e.precision for e in pipe.engines.values()} == {"fp32"}
    image = pipe(**CALL, generator=0).images
    assert image.shape == reference.shape
    assert np.abs(image - reference).max() <= FP32_TOL


def test_img2img_fp32_matches_onnxruntime(lcm_bundle, rgb_image):
    kw = dict(CALL, image=rgb_image, strength=0.6)
    ref = latentrt.load(lcm_bundle)(**kw, generator=1).images
    image = latentrt.load(lcm_bundle, backend="openvino", precision="fp32")(**kw, generator=1).images
    assert np.abs(image - ref).max() <= FP32_TOL


@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no bf16 support in OpenVINO (needs AVX512-BF16 or AMX)")
def test_bf16_psnr(lcm_bundle, reference):
    pipe = latentrt.load(lcm_bundle, backend="openvino", precision="bf16")
    assert {e.precision for e in pipe.engines.values()} == {"bf16"}
    image = pipe(**CALL, generator=0).images
    assert np.isfinite(image).all()
    assert psnr(image, reference) >= MIN_PSNR_DB


def test_auto_precision_and_env(lcm_bundle, monkeypatch):
    """auto: fp32 without bf16, else what this machine's probe found faster (test_openvino_auto_precision.py)."""
    from latentrt.runtime.engines.openvino_auto import auto_precision

    bundle = Bundle(lcm_bundle)
    caps = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    expected = auto_precision(ov.Core(), "CPU", caps, 2) if _has_bf16() else "fp32"
    assert bundle.engine("vae_decoder", "openvino", threads=2).precision == expected
    monkeypatch.setenv(ENV_PRECISION, "fp32")
    assert bundle.engine("vae_decoder", "openvino").precision == "fp32"


def test_ir_cache(lcm_bundle):
    """The first load converts to IR in the bundle's cache; a second load reuses that file; fp32 and
    reduced precisions keep separate files (fp32 weights vs fp16-stored weights)."""
    bundle = Bundle(lcm_bundle)
    first = bundle.engine("vae_decoder", "openvino", precision="fp32").cache_path
    assert first is not None and first.is_file() and first.parent == bundle.cache_dir / "openvino"
    stamp = first.stat().st_mtime_ns
    assert bundle.engine("vae_decoder", "openvino", precision="fp32").cache_path == first
    assert first.stat().st_mtime_ns == stamp, "the second load converted the model again"
    if _has_bf16():
        assert bundle.engine("vae_decoder", "openvino", precision="bf16").cache_path != first
    assert bundle.engine("vae_decoder", "openvino", precision="fp32", cache=False).cache_path is None


def test_bad_options(lcm_bundle):
    with pytest.raises(ValueError, match="precision must be one of .*'fp32'"):
        latentrt.load(lcm_bundle, backend="openvino", precision="int4")
    with pytest.raises(ValueError, match="device must be one of .*openvino backend"):
        latentrt.load(lcm_bundle, backend="openvino", device="tensorrt")


def test_a_full_disk_while_caching_the_ir_compiles_from_onnx(lcm_bundle, tmp_path, monkeypatch, caplog):
    """OpenVINO reports a full disk as a RuntimeError ("basic_ios::clear: iostream error"): the engine warns,
    leaves no partial IR behind and compiles the ONNX file instead (the same image as a cached engine)."""
    import logging
    import shutil

    bundle_dir = tmp_path / "b"
    shutil.copytree(lcm_bundle, bundle_dir, ignore=shutil.ignore_patterns(".cache"))
    real = ov.save_model

    def full_disk(model, path, **kw):
        real(model, path, **kw)  # the partial files exist when the write fails
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp: basic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", full_disk)
    with caplog.at_level(logging.WARNING, logger="latentrt"):
        engine = Bundle(bundle_dir).engine("vae_decoder", "openvino", precision="fp32")
    assert engine.cache_path is None
    assert "could not write its OpenVINO IR cache" in caplog.text and "free there" in caplog.text
    assert not [p for p in (bundle_dir / ".cache" / "openvino").iterdir() if p.suffix in (".xml", ".bin")]
    monkeypatch.setattr(ov, "save_model", real)
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    cached = Bundle(lcm_bundle).engine("vae_decoder", "openvino", precision="fp32")
    assert np.abs(engine(latent_sample=lat)["sample"] - cached(latent_sample=lat)["sample"]).max() <= 1e-6
