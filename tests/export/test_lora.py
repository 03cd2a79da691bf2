"""LoRA fused at export: a bundle with a tiny LCM-LoRA (kohya format, UNet only) plus a style LoRA
(diffusers/PEFT format, UNet and text encoder) at weight 0.5 equals diffusers with the same LoRAs
loaded and fused; LoRAs that do not fit the model are refused with the file named."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import latentrt
from latentrt.export.lora import LoraError, LoraSpec, fuse_loras
from latentrt.runtime.random import TorchGeneratorNoise

TOL = 1e-4


@pytest.fixture(scope="module")
def lora_files(base, tmp_path_factory):
    from latentrt.export.tiny import save_tiny_lora

    d = tmp_path_factory.mktemp("loras")
    lcm = save_tiny_lora(d / "tiny-lcm-lora.safetensors", base, rank=4, fmt="kohya", text_encoder=False,
                         alpha=2, seed=1)
    style = save_tiny_lora(d / "style.safetensors", base, rank=2, fmt="peft", text_encoder=True, seed=2)
    return lcm, style


@pytest.fixture(scope="module")
def lora_bundle(sd_dir, lora_files, tmp_path_factory):
    """Exported through the CLI: ``latentrt export DIR -o OUT --lora LCM --lora STYLE:0.5``."""
    from latentrt.cli import main

    lcm, style = lora_files
    out = tmp_path_factory.mktemp("bundles") / "sd-lcm-lora"
    assert main(["export", str(sd_dir), "-o", str(out), "--lora", str(lcm), "--lora", f"{style}:0.5",
                 "--no-check"]) == 0
    return out


@pytest.fixture(scope="module")
def ours(lora_bundle):
    return latentrt.load(lora_bundle)


@pytest.fixture(scope="module")
def ref(sd_dir, lora_files):
    """diffusers with the same LoRAs loaded (weights 1.0 and 0.5) and fused, LCMScheduler."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    lcm, style = lora_files
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lcm), adapter_name="lcm")
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.5])
    pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_lcm_lora_txt2img_parity(ref, ours, base):
    kw = dict(prompt="a red cat", num_inference_steps=4, guidance_scale=1.0, output_type="np")
    want = ref(**kw, generator=torch.Generator().manual_seed(3)).images
    got = ours(**kw, scheduler="LCMScheduler", generator=TorchGeneratorNoise(3)).images
    assert _diff(got, want) <= TOL and float(want.std()) > 1e-2
    # the LoRAs really changed the model
    from diffusers import LCMScheduler, StableDiffusionPipeline

    plain = StableDiffusionPipeline(**{**base.components, "scheduler": LCMScheduler.from_config(base.scheduler.config)})
    plain.set_progress_bar_config(disable=True)
    assert _diff(plain(**kw, generator=torch.Generator().manual_seed(3)).images, got) > 1e-3


def test_lora_img2img_with_guidance_parity(ref, ours):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = StableDiffusionImg2ImgPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red cat", image=image, strength=0.75, num_inference_steps=4, guidance_scale=2.0,
              negative_prompt="blurry", output_type="np")
    want = pipe(**kw, generator=torch.Generator().manual_seed(8)).images
    got = ours(**kw, scheduler="LCMScheduler", generator=TorchGeneratorNoise(8)).images
    assert _diff(got, want) <= TOL


def test_manifest_records_the_loras(lora_bundle, lora_files):
    m = json.loads((lora_bundle / "latentrt.json").read_text())
    assert m["pipeline"] == "sd"
    loras = m["extra"]["loras"]
    assert [(r["source"], r["weight"], r["format"]) for r in loras] == [
        (str(lora_files[0]), 1.0, "kohya"), (str(lora_files[1]), 0.5, "diffusers")]
    # 4 transformer blocks (down, mid, 2 up) x (2 attentions x q, k, v, out + proj_in + proj_out)
    assert loras[0]["layers"] == {"unet": 40}
    assert loras[1]["layers"]["text_encoder"] == 12 and len(loras[1]["sha256"]) == 64


# -- bad LoRAs -----------------------------------------------------------------------------------


def _save(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_lora_whose_keys_fit_no_layer(base, tmp_path):
    peft = _save(tmp_path / "other-model.safetensors", {
        "unet.mid_block.foo.to_q.lora_A.weight": torch.zeros(4, 8),
        "unet.mid_block.foo.to_q.lora_B.weight": torch.zeros(8, 4)})
    kohya = _save(tmp_path / "other-kohya.safetensors", {
        "lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 8), "lora_unet_foo_bar.lora_up.weight": torch.zeros(8, 4),
        "lora_unet_foo_bar.alpha": torch.tensor(4.0)})
    for path in (peft, kohya):
        with pytest.raises(LoraError, match=f"LoRA {path} does not fit this StableDiffusionPipeline"):
            fuse_loras(copy.deepcopy(base), [str(path)])


def test_lora_that_fits_only_partly(base, tmp_path):
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = _save(tmp_path / "partial.safetensors", {
        f"{name}.lora_A.weight": torch.zeros(4, 32), f"{name}.lora_B.weight": torch.zeros(32, 4),
        "unet.nothere.lora_A.weight": torch.zeros(4, 8), "unet.nothere.lora_B.weight": torch.zeros(8, 4)})
    with pytest.raises(LoraError, match=f"LoRA {path}: only 1 of its 2 unet layers fit a layer of this model "
                                        r"\(not found: 'nothere'\)"):
        fuse_loras(copy.deepcopy(base), [path])


def test_not_a_lora_and_missing_file(base, tmp_path):
    path = _save(tmp_path / "weights.safetensors", {"conv.weight": torch.zeros(4, 8)})
    with pytest.raises(LoraError, match=f"LoRA {path}"):
        fuse_loras(copy.deepcopy(base), [path])
    with pytest.raises(LoraError, match="no such file or folder"):
        fuse_loras(base, [str(tmp_path / "missing.safetensors")])


def test_failed_lora_export_leaves_nothing(sd_dir, tmp_path):
    from latentrt.export.bundle import export_bundle

    bad = _save(tmp_path / "bad.safetensors", {"unet.x.lora_A.weight": torch.zeros(4, 8),
                                               "unet.x.lora_B.weight": torch.zeros(8, 4)})
    with pytest.raises(LoraError, match="bad.safetensors"):
        export_bundle(sd_dir, tmp_path / "out", loras=[f"{bad}:0.7"], progress=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_lora_spec_parsing(tmp_path):
    assert LoraSpec.parse("style.safetensors:0.5") == LoraSpec("style.safetensors", 0.5)
    assert LoraSpec.parse("latent-consistency/lcm-lora-sdv1-5") == LoraSpec("latent-consistency/lcm-lora-sdv1-5", 1.0)
    assert LoraSpec.parse("owner/name:-1") == LoraSpec("owner/name", -1.0)
    assert LoraSpec.coerce(("a.safetensors", 2)) == LoraSpec("a.safetensors", 2.0)
    assert LoraSpec.coerce(tmp_path) == LoraSpec(str(tmp_path), 1.0)
    with pytest.raises(LoraError, match="SRC"):
        LoraSpec.parse("")
    with pytest.raises(TypeError, match="SRC"):
        LoraSpec.coerce(3)
