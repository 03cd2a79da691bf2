"""Low-memory export (fp16 components loaded as fp16, no fp32 copy), trace size and check modes.

The full-size case this exists for (an fp16 SDXL bundle on a 24 GiB machine) is measured in
benchmarks/RESULTS.md; here a tiny SDXL-LCM pipeline checks that the shortcut changes nothing in
the bundle's images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

KEEP_VAE = {"vae_decoder": "fp32", "vae_encoder": "fp32"}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from latentrt.export.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "m", lcm=True)


def _image(bundle):
    import latentrt
    from latentrt.runtime.random import TorchGeneratorNoise

    pipe = latentrt.load(bundle)
    return pipe("a red cube", height=64, width=64, num_inference_steps=2, generator=TorchGeneratorNoise(0),
                output_type="np").images


def test_load_dtypes_follow_the_export_precision():
    import torch

    from latentrt.export.bundle import load_dtypes

    assert load_dtypes("fp16", KEEP_VAE) == {"default": torch.float16, "vae": torch.float32}
    assert load_dtypes("fp32", {"unet": "fp16"}) == {"default": torch.float32, "unet": torch.float16}
    # a VAE whose decoder stays fp32 loads in fp32 even when its encoder is exported in fp16
    assert load_dtypes("fp16", {"vae_decoder": "fp32", "vae_encoder": "fp16"})["vae"] == torch.float32
    assert load_dtypes("fp16", {"vae_encoder": "fp16", "vae_decoder": "fp32"})["vae"] == torch.float32
    # an fp32 bundle with an fp16 encoder: the decoder still exports from fp32 weights
    assert load_dtypes("fp32", {"vae_encoder": "fp16"})["vae"] == torch.float32
    assert load_dtypes("fp32", {"vae_encoder": "fp16", "vae_decoder": "fp16"})["vae"] == torch.float16


def test_low_memory_fp16_bundle_equals_the_usual_fp16_bundle(sdxl_folder, tmp_path):
    """Same weights, same fp16 graphs: the images agree to fp16 precision, and the manifest records
    that fp16 graphs were checked against the fp16 module (fp32 ones against fp32)."""
    from latentrt.export.bundle import export_bundle

    quiet = dict(progress=lambda *_: None)
    export_bundle(sdxl_folder, tmp_path / "usual", precision="fp16", component_precision=KEEP_VAE, **quiet)
    export_bundle(sdxl_folder, tmp_path / "low", precision="fp16", component_precision=KEEP_VAE, low_memory=True,
                  trace_size=64, check="quick", **quiet)
    a, b = _image(tmp_path / "usual"), _image(tmp_path / "low")
    assert np.isfinite(b).all()
    assert float(np.abs(a - b).max()) <= 2e-3
    m = json.loads((tmp_path / "low" / "latentrt.json").read_text())
    assert m["extra"]["export"] == {"check": "quick", "trace_size": [64, 64], "low_memory": True}
    refs = {name: c["parity"]["reference"] for name, c in m["components"].items()}
    assert refs["unet"].startswith("torch fp16") and refs["text_encoder_2"].startswith("torch fp16")
    assert refs["vae_decoder"] == "torch fp32"
    assert {c["precision"] for n, c in m["components"].items() if n.startswith("vae")} == {"fp32"}


def test_check_off_is_recorded_and_shown(sdxl_folder, tmp_path, capsys):
    from latentrt.cli import main
    from latentrt.export.bundle import export_bundle

    export_bundle(sdxl_folder, tmp_path / "b", check="off", trace_size=64, progress=lambda *_: None)
    m = json.loads((tmp_path / "b" / "latentrt.json").read_text())
    assert all(c["parity"]["checked"] is False for c in m["components"].values())
    assert main(["info", str(tmp_path / "b")]) == 0
    assert "not checked" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [
    (dict(check="some"), "check must be one of"),
    (dict(trace_size=4), "trace_size must be an image size"),
    (dict(trace_size=100), "multiple of"),
])
def test_bad_export_options_are_refused(sdxl_folder, tmp_path, kwargs, message):
    from latentrt.export.bundle import export_bundle

    with pytest.raises(ValueError, match=message):
        export_bundle(sdxl_folder, tmp_path / "x", progress=lambda *_: None, **kwargs)
    assert not (tmp_path / "x").exists()


def test_export_cli_passes_the_low_memory_options(sdxl_folder, tmp_path):
    from latentrt.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(sdxl_folder), "-o", str(out), "--precision", "fp16", "--component-precision",
                 "vae_decoder=fp32", "--low-memory", "--trace-size", "64", "--check", "off"]) == 0
    m = json.loads((out / "latentrt.json").read_text())
    assert m["extra"]["export"] == {"check": "off", "trace_size": [64, 64], "low_memory": True}
    assert m["components"]["vae_decoder"]["precision"] == "fp32"
