"""Single-file checkpoints (issue 17 item 4): a tiny SD pipeline's weights written under the original
LDM key names export, through diffusers' from_single_file and --config, to the bundle its folder gives."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import latentrt
from latentrt.export.bundle import export_bundle
from latentrt.export.single_file import SingleFileError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from latentrt.export.tiny import save_tiny_sd
    from latentrt.export.tiny_ldm import save_ldm_checkpoint

    d = tmp_path_factory.mktemp("single-file")
    folder = save_tiny_sd(d / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    ckpt = save_ldm_checkpoint(pipe, d / "tiny-sd.safetensors")
    return folder, ckpt


def _export(src, out, **kw):
    export_bundle(src, out, check="off", progress=lambda *_: None, **kw)
    return latentrt.load(out)


def test_the_ldm_file_converts_back_to_the_same_weights(files):
    from diffusers import StableDiffusionPipeline

    folder, ckpt = files
    a = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    b = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(folder), local_files_only=True,
                                                 torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_single_file_bundle_equals_the_folders(files, tmp_path):
    folder, ckpt = files
    a = _export(folder, tmp_path / "from-folder")
    b = _export(ckpt, tmp_path / "from-file", config=str(folder))
    ma, mb = a.bundle.manifest, b.bundle.manifest
    assert ma.pipeline == mb.pipeline == "sd" and ma.constants == mb.constants
    for name, entry in ma.components.items():
        assert entry.files == mb.components[name].files, name  # the same ONNX bytes, file by file
    assert mb.source["single_file"] and mb.source["path"].endswith("tiny-sd.safetensors")
    kw = dict(num_inference_steps=2, generator=1, output_type="np")
    assert np.array_equal(a("a red cat", **kw).images, b("a red cat", **kw).images)


def test_ckpt_needs_allow_pickle(files, tmp_path):
    from safetensors.torch import load_file

    folder, ckpt = files
    pt = tmp_path / "tiny-sd.ckpt"
    torch.save({"state_dict": load_file(str(ckpt))}, str(pt))
    with pytest.raises(SingleFileError, match="--allow-pickle"):
        export_bundle(pt, tmp_path / "x", config=str(folder), check="off", progress=lambda *_: None)
    r = subprocess.run([sys.executable, "-m", "latentrt.cli", "export", str(pt), "-o", str(tmp_path / "y"),
                        "--config", str(folder)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "--allow-pickle" in last, r.stderr
    ours = _export(pt, tmp_path / "z", config=str(folder), allow_pickle=True)
    assert ours.bundle.manifest.pipeline == "sd"
