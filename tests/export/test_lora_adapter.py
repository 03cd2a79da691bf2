"""LoRA adapter mode (``--lora-mode adapter``): LoRAs kept unfused, their factors per call.

One bundle, exported through the CLI from files on disk: a tiny kohya LCM-LoRA (UNet only, named
``lcm`` by ``SRC:WEIGHT:NAME``) and a PEFT-format style LoRA (UNet + text encoder, weight 0.5, named
``style`` after its file) plus a ControlNet. The reference is diffusers with the same files loaded from
disk (``load_lora_weights(..., adapter_name=...)``, ``set_adapters``) called with
``cross_attention_kwargs={"scale": s}``, which scales the UNet and (``lora_scale`` in ``encode_prompt``)
the text encoder. Each parity test first shows that the LoRA arguments change diffusers' image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import latentrt
from latentrt.runtime.pipelines.lora_scales import LoraArgumentError, resolve_lora_scales
from latentrt.runtime.random import TorchGeneratorNoise

TOL = 1e-4
PROMPT = "a red cat"


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    from latentrt.export.tiny import save_tiny_lora
    from latentrt.export.tiny_control import save_tiny_controlnet

    d = tmp_path_factory.mktemp("loras")
    lcm = save_tiny_lora(d / "tiny-lcm-lora.safetensors", base, rank=4, fmt="kohya", text_encoder=False, alpha=2,
                         seed=1, scale=0.3)
    style = save_tiny_lora(d / "style.safetensors", base, rank=2, fmt="peft", text_encoder=True, seed=2, scale=0.4)
    cn = save_tiny_controlnet(d / "controlnet", base.unet)
    return lcm, style, cn


@pytest.fixture(scope="module")
def bundle(sd_dir, files, tmp_path_factory):
    """``latentrt export DIR -o OUT --lora LCM:1:lcm --lora STYLE:0.5 --lora-mode adapter --controlnet CN``."""
    from latentrt.cli import main

    lcm, style, cn = files
    out = tmp_path_factory.mktemp("bundles") / "sd-lora-adapters"
    assert main(["export", str(sd_dir), "-o", str(out), "--lora", f"{lcm}:1:lcm", "--lora", f"{style}:0.5",
                 "--lora-mode", "adapter", "--controlnet", str(cn), "--check", "off"]) == 0
    return out


@pytest.fixture(scope="module")
def ours(bundle):
    return latentrt.load(bundle)


@pytest.fixture(scope="module")
def ref(sd_dir, files):
    """diffusers with both LoRAs loaded from disk as adapters (weights set by each test)."""
    from diffusers import StableDiffusionPipeline

    lcm, style, _ = files
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lcm), adapter_name="lcm")
    pipe.load_lora_weights(str(style), adapter_name="style")
    return pipe


def _diff(a, b) -> float:
    a, b = (x.detach().numpy() if isinstance(x, torch.Tensor) else x for x in (a, b))
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _plain(base, ref, cls=None, **extra):
    """A diffusers pipeline of ``cls`` on the base model (no LoRA) with ``ref``'s scheduler."""
    from diffusers import StableDiffusionPipeline

    pipe = (cls or StableDiffusionPipeline)(**{**base.components, "scheduler": ref.scheduler}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CFG = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=3.0, negative_prompt="blurry", output_type="np")


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_scale_parity_with_guidance(ref, ours, base, scale):
    """Default weights (1.0 and 0.5, as exported) times the call's scale; CFG, the bundle's scheduler."""
    ref.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.5])
    want = ref(**CFG, cross_attention_kwargs={"scale": scale}, generator=torch.Generator().manual_seed(3)).images
    plain = _plain(base, ref)(**CFG, generator=torch.Generator().manual_seed(3)).images
    assert _diff(want, plain) > 1e-2 and float(want.std()) > 1e-2  # the LoRAs change diffusers' image
    if scale != 1.0:
        full = ref(**CFG, generator=torch.Generator().manual_seed(3)).images
        assert _diff(want, full) > 1e-3  # and so does the scale
    kw = {"cross_attention_kwargs": {"scale": scale}} if scale != 1.0 else {"lora_scale": scale}
    got = ours(**CFG, **kw, generator=TorchGeneratorNoise(3)).images
    assert _diff(got, want) <= TOL


def test_text_encoder_gets_the_scale(ref, ours):
    """diffusers' ``encode_prompt(lora_scale=s)`` scales the text encoder's LoRA layers; so does ours."""
    ref.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.5])
    want = ref.encode_prompt(PROMPT, "cpu", 1, False, lora_scale=0.5)[0]
    unscaled = ref.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert _diff(want, unscaled) > 1e-3
    got = ours.encode_prompt(PROMPT, lora_scale=0.5)[0]
    assert _diff(got, want) <= TOL
    assert _diff(ours.encode_prompt(PROMPT)[0], unscaled) <= TOL  # a later call without a scale: the defaults


def test_two_loras_with_their_own_weights_lcm(ref, ours, base):
    """Per-LoRA weights (0.3 and 1.2 instead of the exported 1.0 and 0.5) and a scale, LCMScheduler."""
    from diffusers import LCMScheduler

    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, output_type="np")
    saved = ref.scheduler
    ref.scheduler = LCMScheduler.from_config(saved.config)
    try:
        ref.set_adapters(["lcm", "style"], adapter_weights=[0.3, 1.2])
        want = ref(**kw, cross_attention_kwargs={"scale": 0.8}, generator=torch.Generator().manual_seed(4)).images
        ref.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.5])
        default = ref(**kw, cross_attention_kwargs={"scale": 0.8}, generator=torch.Generator().manual_seed(4)).images
    finally:
        ref.scheduler = saved
    assert _diff(want, default) > 1e-3  # the weights change diffusers' image
    got = ours(**kw, scheduler="LCMScheduler", lora_weights={"lcm": 0.3, "style": 1.2},
               cross_attention_kwargs={"scale": 0.8}, generator=TorchGeneratorNoise(4)).images
    assert _diff(got, want) <= TOL


def test_weight_zero_switches_a_lora_off(ref, ours, base):
    ref.set_adapters(["lcm", "style"], adapter_weights=[0.0, 0.5])
    want = ref(**CFG, generator=torch.Generator().manual_seed(5)).images
    ref.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.5])
    both = ref(**CFG, generator=torch.Generator().manual_seed(5)).images
    assert _diff(want, both) > 1e-3
    got = ours(**CFG, lora_weights={"lcm": 0}, generator=TorchGeneratorNoise(5)).images
    assert _diff(got, want) <= TOL
    # both off: the base model
    plain = _plain(base, ref)(**CFG, generator=torch.Generator().manual_seed(5)).images
    off = ours(**CFG, lora_weights={"lcm": 0.0, "style": 0.0}, generator=TorchGeneratorNoise(5)).images
    assert _diff(off, plain) <= TOL


def test_controlnet_residual_unet_graph_gets_the_scales(ref, ours, base, files):
    """The ControlNet bundle's residual UNet graph takes lora_scales too (StableDiffusionControlNetPipeline)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    cn = ControlNetModel.from_pretrained(str(files[2]), dtype=torch.float32)
    control = Image.fromarray(np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = StableDiffusionControlNetPipeline(**{**ref.components, "controlnet": cn})
    pipe.set_progress_bar_config(disable=True)
    ref.set_adapters(["lcm", "style"], adapter_weights=[0.6, 1.0])
    kw = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=2.0, output_type="np")
    want = pipe(**kw, image=control, cross_attention_kwargs={"scale": 0.5},
                generator=torch.Generator().manual_seed(7)).images
    plain = _plain(base, ref, StableDiffusionControlNetPipeline, controlnet=cn)(
        **kw, image=control, generator=torch.Generator().manual_seed(7)).images
    assert _diff(want, plain) > 1e-3
    got = ours(**kw, control_image=control, lora_weights={"lcm": 0.6, "style": 1.0}, lora_scale=0.5,
               generator=TorchGeneratorNoise(7)).images
    assert "unet_controlnet" in ours.engines
    assert _diff(got, want) <= TOL


def test_concurrent_calls_keep_their_own_weights(ours):
    """The factors are state of the call (per thread): two threads with different weights at once."""
    from concurrent.futures import ThreadPoolExecutor

    kw = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    weights = [{"lcm": 0.0, "style": 0.0}, {"lcm": 1.0, "style": 1.5}] * 2
    alone = [ours(**kw, lora_weights=w, generator=TorchGeneratorNoise(1)).images for w in weights[:2]]
    assert _diff(*alone) > 1e-3
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda w: ours(**kw, lora_weights=w, generator=TorchGeneratorNoise(1)).images, weights))
    for i, img in enumerate(together):
        assert _diff(img, alone[i % 2]) <= 1e-6


def test_fp16_bundle(sd_dir, files, ref, tmp_path):
    """An fp16 adapter bundle (its lora_scales input is float16, fed from the same float32 factors)."""
    from latentrt.export.bundle import export_bundle

    lcm, style, _ = files
    m = export_bundle(sd_dir, tmp_path / "fp16", loras=[f"{lcm}:1:lcm", f"{style}:0.5"], lora_mode="adapter",
                      precision="fp16", check="off", progress=lambda *_: None)
    assert {s.name: s.dtype for s in m.components["unet"].spec.inputs}["lora_scales"] == "float16"
    ref.set_adapters(["lcm", "style"], adapter_weights=[0.5, 1.0])
    want = ref(**CFG, cross_attention_kwargs={"scale": 0.5}, generator=torch.Generator().manual_seed(3)).images
    got = latentrt.load(tmp_path / "fp16")(**CFG, lora_weights={"lcm": 0.5, "style": 1.0}, lora_scale=0.5,
                                           generator=TorchGeneratorNoise(3)).images
    assert _diff(got, want) <= 2e-2
    # a ControlNet added later would get a residual UNet graph without the LoRAs: refused
    from latentrt.export.control_bundle import add_conditioning

    with pytest.raises(ValueError, match="this bundle has LoRAs, which the unet_controlnet graph exported from SRC"):
        add_conditioning(tmp_path / "fp16", [files[2]], src=sd_dir, progress=lambda *_: None)


def test_torch_backend_refuses_lora_bundles(bundle):
    with pytest.raises(ValueError, match="the torch backend builds .* from the source model, which lacks this "
                                         r"bundle's LoRAs"):
        latentrt.load(bundle, backend="torch")


def test_manifest_records_the_adapters(bundle, files):
    m = json.loads((bundle / "latentrt.json").read_text())
    info = m["extra"]["lora_adapter"]
    assert info["names"] == ["lcm", "style"] and info["weights"] == [1.0, 0.5] and info["input"] == "lora_scales"
    assert set(info["components"]) == {"text_encoder", "unet", "unet_controlnet"}
    recs = m["extra"]["loras"]
    assert [(r["name"], r["rank"], r["weight"], r["mode"]) for r in recs] == [
        ("lcm", 4, 1.0, "adapter"), ("style", 2, 0.5, "adapter")]
    assert recs[0]["layers"] == {"unet": 40} and recs[1]["layers"]["text_encoder"] == 12
    for comp in ("unet", "unet_controlnet", "text_encoder"):
        spec = {s["name"]: s for s in m["components"][comp]["inputs"]}
        assert spec["lora_scales"]["shape"] == [2] and spec["lora_scales"]["dtype"] == "float32"
    assert "lora_scales" not in {s["name"] for s in m["components"]["controlnet_0"]["inputs"]}


# -- bad input ----------------------------------------------------------------------------------


def test_bad_lora_arguments(ours):
    kw = dict(prompt=PROMPT, num_inference_steps=1, output_type="latent")
    cases = [
        (dict(lora_weights={"nope": 1.0}), r"lora_weights names a LoRA 'nope' that this bundle does not have; its "
                                           r"LoRAs are \['lcm', 'style'\]"),
        (dict(lora_weights={"style": "0.5"}), r"lora_weights\['style'\] must be a number; got '0.5'"),
        (dict(lora_weights={"style": True}), r"lora_weights\['style'\] must be a number"),
        (dict(lora_weights={"style": float("nan")}), "must be a finite number"),
        (dict(lora_weights=[("style", 1.0)]), "lora_weights must be a dict"),
        (dict(cross_attention_kwargs={"scale": "high"}), r"cross_attention_kwargs\['scale'\] must be a number"),
        (dict(cross_attention_kwargs={"scale": 0.5, "ip_adapter_masks": 1}), "takes only 'scale'"),
        (dict(cross_attention_kwargs=0.5), "cross_attention_kwargs must be a dict"),
        (dict(lora_scale=[0.5]), "lora_scale must be a number"),
        (dict(lora_scale=0.5, cross_attention_kwargs={"scale": 0.7}), "disagree"),
    ]
    for extra, match in cases:
        with pytest.raises(LoraArgumentError, match=match):
            ours(**kw, **extra)
    assert issubclass(LoraArgumentError, ValueError)
    assert ours.lora_names == ["lcm", "style"]


def test_lora_arguments_on_a_bundle_without_adapters(lcm_bundle):
    """lora_weights (and a scale other than 1) on a bundle without LoRA adapters (none, or fused) are refused."""
    pipe = latentrt.load(lcm_bundle)
    kw = dict(prompt=PROMPT, num_inference_steps=1, output_type="latent")
    with pytest.raises(LoraArgumentError, match=r"lora_weights=\{'style': 0.5\}: this bundle has no LoRA adapters.*"
                                                "--lora-mode adapter"):
        pipe(**kw, lora_weights={"style": 0.5})
    with pytest.raises(LoraArgumentError, match="a LoRA scale of 0.5 needs LoRA adapters"):
        pipe(**kw, cross_attention_kwargs={"scale": 0.5})
    assert pipe.lora_names == []
    # the identity scale is what diffusers does without LoRAs: accepted
    assert resolve_lora_scales(None, {"scale": 1.0}, 1.0, {}) is None
    np.testing.assert_array_equal(resolve_lora_scales((["a", "b"], [1.0, 0.5]), {"scale": 0.5}, None, {"a": 2}),
                                  np.float32([1.0, 0.25]))


def test_lora_names_and_spec_parsing(tmp_path):
    from latentrt.export.lora import LoraError
    from latentrt.export.lora_adapter import AdapterSpec, default_name, load_lora_adapters

    assert AdapterSpec.parse("a/style.safetensors:0.5:my-style") == AdapterSpec("a/style.safetensors", 0.5, "my-style")
    assert AdapterSpec.parse("style.safetensors:0.5") == AdapterSpec("style.safetensors", 0.5)
    assert AdapterSpec.parse("C:/loras/x.safetensors") == AdapterSpec("C:/loras/x.safetensors", 1.0)
    assert AdapterSpec.parse("style.safetensors:-1:neg").weight == -1.0
    assert AdapterSpec.coerce(("x.safetensors", 2, "x2")) == AdapterSpec("x.safetensors", 2.0, "x2")
    assert default_name("/p/style.v2.safetensors") == "style_v2"
    assert default_name("latent-consistency/lcm-lora-sdv1-5") == "lcm-lora-sdv1-5"
    assert default_name("owner/name/pytorch_lora_weights.safetensors") == "pytorch_lora_weights"
    with pytest.raises(LoraError, match="the LoRA name 'bad name' must be"):
        AdapterSpec.parse("style.safetensors:0.5:bad name")
    with pytest.raises(LoraError, match="weight must be a finite number"):
        AdapterSpec.coerce(("x.safetensors", "heavy"))
    with pytest.raises(LoraError, match=r"two LoRAs are named 'style'.*SRC:WEIGHT:NAME"):
        load_lora_adapters(object(), ["a/style.safetensors", "b/style.safetensors:0.5"])


def test_adapter_mode_needs_loras_and_a_known_mode(sd_dir, tmp_path):
    from latentrt.export.bundle import export_bundle

    with pytest.raises(ValueError, match="needs at least one LoRA"):
        export_bundle(sd_dir, tmp_path / "a", lora_mode="adapter", progress=lambda *_: None)
    with pytest.raises(ValueError, match="lora_mode must be 'fused' or 'adapter'"):
        export_bundle(sd_dir, tmp_path / "b", lora_mode="merged", progress=lambda *_: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- SDXL: the scale reaches both text encoders --------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL base on disk, a UNet LoRA (kohya) and a style LoRA on the UNet and both text encoders
    (PEFT keys), and the bundle exported with both as adapters."""
    from safetensors.torch import load_file, save_file

    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import TEXT_LORA_TARGETS, _lora_pairs, save_tiny_lora, save_tiny_sdxl, tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("sdxl")
    src = save_tiny_sdxl(root / "tiny-sdxl", 1)
    pipe = tiny_sdxl_pipeline(1)
    unet_lora = save_tiny_lora(root / "unet-lora.safetensors", pipe, fmt="kohya", text_encoder=False, seed=1, scale=0.3)
    style = save_tiny_lora(root / "style.safetensors", pipe, fmt="peft", seed=2, scale=0.3)
    sd = load_file(str(style))
    te2 = pipe.text_encoder_2
    prefix = "" if hasattr(te2, "text_model") else "text_model."
    for name, down, up in _lora_pairs(te2, TEXT_LORA_TARGETS, 4, torch.Generator().manual_seed(3), 0.3):
        sd[f"text_encoder_2.{prefix}{name}.lora_A.weight"] = down.contiguous()
        sd[f"text_encoder_2.{prefix}{name}.lora_B.weight"] = up.contiguous()
    save_file(sd, str(style))
    out = root / "bundle"
    export_bundle(src, out, loras=[f"{unet_lora}:1.0:unet", (str(style), 0.7)], lora_mode="adapter", check="off",
                  progress=lambda *_: None)
    return src, unet_lora, style, out


def test_sdxl_scale_and_weights_reach_both_text_encoders(sdxl):
    from diffusers import StableDiffusionXLPipeline

    src, unet_lora, style, out = sdxl
    ours = latentrt.load(out)
    info = ours.bundle.manifest.extra["lora_adapter"]
    assert info["names"] == ["unet", "style"] and set(info["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    plain = StableDiffusionXLPipeline.from_pretrained(str(src), dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    ref = StableDiffusionXLPipeline.from_pretrained(str(src), dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(unet_lora), adapter_name="unet")
    ref.load_lora_weights(str(style), adapter_name="style")
    ref.set_adapters(["unet", "style"], adapter_weights=[0.8, 1.3])
    kw = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=4.0, output_type="np")
    want = ref(**kw, cross_attention_kwargs={"scale": 0.5}, generator=torch.Generator().manual_seed(2)).images
    assert _diff(want, plain(**kw, generator=torch.Generator().manual_seed(2)).images) > 1e-3
    enc = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    te_want = ref.encode_prompt(PROMPT, **enc, lora_scale=0.5)
    assert _diff(te_want[0], ref.encode_prompt(PROMPT, **enc)[0]) > 1e-3
    got = ours(**kw, lora_weights={"unet": 0.8, "style": 1.3}, cross_attention_kwargs={"scale": 0.5},
               generator=TorchGeneratorNoise(2)).images
    assert _diff(got, want) <= TOL
    te_got = ours.encode_prompt(PROMPT, lora_scale=0.5, lora_weights={"unet": 0.8, "style": 1.3},
                                do_classifier_free_guidance=False)
    for g, w in ((te_got[0], te_want[0]), (te_got[2], te_want[2])):  # both encoders' states, pooled (encoder 2)
        assert _diff(g, w) <= TOL
