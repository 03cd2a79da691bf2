"""Every per-call feature that changes the UNet graph, in one bundle and in one call: a ControlNet, an
IP-Adapter image prompt, FreeU and a LoRA kept as an adapter (its scale per call), on the tiny LCM. The
features are exported by separate modules (export/control.py, ip_adapter.py, freeu.py, lora_adapter.py)
that each add inputs to every UNet graph; this checks that they compose: the bundle's image equals
diffusers' with ``load_ip_adapter``, ``enable_freeu``, ``load_lora_weights`` and the ControlNet pipeline,
same noise, fp32 within 1e-4, and switching each feature off in the same call gives diffusers' image
without it."""

from __future__ import annotations

import copy

import numpy as np
import pytest

TOL = 1e-4
FREEU = (0.9, 0.2, 1.2, 1.4)
LORA_SCALE = 0.7
IP_SCALE = 0.6


def picture(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.exp(-((y - a) ** 2 + (x - b) ** 2) * c) for a, b, c in rng.uniform(0.2, 8, (3, 3))], -1)
    img[h // 3: h // 2] = 1.0
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


IP_IMAGE, CTRL = picture(40, 48, 7), picture(64, 64, 9)
CALL = dict(prompt="a red cat on a hill", num_inference_steps=3, guidance_scale=8.0, height=64, width=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny import save_tiny_lora, tiny_lcm_pipeline
    from latentrt.export.tiny_control import tiny_controlnet
    from latentrt.export.tiny_ip_adapter import save_tiny_ip_adapter

    import latentrt

    import torch
    from diffusers import LatentConsistencyModelPipeline

    root = tmp_path_factory.mktemp("combined")
    tiny_lcm_pipeline(0).save_pretrained(str(root / "tiny-lcm"))  # loaded back from disk, as users load a checkpoint
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(root / "tiny-lcm"), dtype=torch.float32)
    cn = tiny_controlnet(pipe.unet, 11)
    ip = save_tiny_ip_adapter(root / "ip", pipe.unet)
    lora = save_tiny_lora(root / "style.safetensors", pipe, rank=4, fmt="peft", text_encoder=True, seed=2, scale=0.4)
    export_bundle(None, root / "bundle", pipe=pipe, check="off", progress=lambda *_: None, controlnets=[cn],
                  ip_adapter=ip, freeu=True, loras=[f"{lora}:1.0:style"], lora_mode="adapter")
    return pipe, cn, ip, lora, latentrt.load(root / "bundle")


def _reference(pipe, cn, ip, lora, *, freeu: bool, with_ip: bool, with_lora: bool):
    """diffusers' ControlNet pipeline over a copy of the LCM pipeline's modules, with the features asked for."""
    from diffusers import StableDiffusionControlNetPipeline

    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor", "safety_checker")}
    parts.update(unet=copy.deepcopy(pipe.unet), text_encoder=copy.deepcopy(pipe.text_encoder), controlnet=cn,
                 image_encoder=None, feature_extractor=None, safety_checker=None, requires_safety_checker=False)
    ref = StableDiffusionControlNetPipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    if with_ip:
        ref.load_ip_adapter(str(ip.parent), subfolder="", weight_name=ip.name)
        ref.set_ip_adapter_scale(IP_SCALE)
    if with_lora:
        ref.load_lora_weights(str(lora), adapter_name="style")
    if freeu:
        ref.enable_freeu(*FREEU)
    return ref


def _run_ref(ref, **kw):
    import torch

    return ref(**CALL, image=CTRL, output_type="np", generator=torch.Generator().manual_seed(4), **kw).images


def _run_ours(pipe, **kw):
    from latentrt.runtime.random import TorchGeneratorNoise

    return pipe(**CALL, control_image=CTRL, output_type="np", generator=TorchGeneratorNoise(4), **kw).images


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_controlnet_ip_adapter_freeu_and_lora_in_one_call(setup):
    pipe, cn, ip, lora, ours = setup
    want = _run_ref(_reference(pipe, cn, ip, lora, freeu=True, with_ip=True, with_lora=True),
                    ip_adapter_image=IP_IMAGE, cross_attention_kwargs={"scale": LORA_SCALE})
    plain = _run_ref(_reference(pipe, cn, ip, lora, freeu=False, with_ip=False, with_lora=False))
    assert _diff(want, plain) > 1e-2  # together the features change diffusers' image
    got = _run_ours(ours, ip_adapter_image=IP_IMAGE, ip_adapter_scale=IP_SCALE, freeu=FREEU,
                    cross_attention_kwargs={"scale": LORA_SCALE})
    assert _diff(got, want) <= TOL


@pytest.mark.parametrize("off", ["freeu", "ip", "lora"])
def test_each_feature_switches_off_on_its_own(setup, off):
    pipe, cn, ip, lora, ours = setup
    ref = _reference(pipe, cn, ip, lora, freeu=off != "freeu", with_ip=off != "ip", with_lora=off != "lora")
    want = _run_ref(ref, **({} if off == "ip" else {"ip_adapter_image": IP_IMAGE}),
                    **({} if off == "lora" else {"cross_attention_kwargs": {"scale": LORA_SCALE}}))
    both = _run_ref(_reference(pipe, cn, ip, lora, freeu=True, with_ip=True, with_lora=True),
                    ip_adapter_image=IP_IMAGE, cross_attention_kwargs={"scale": LORA_SCALE})
    assert _diff(want, both) > 1e-3  # the feature switched off matters in diffusers
    got = _run_ours(ours, **({} if off == "ip" else {"ip_adapter_image": IP_IMAGE, "ip_adapter_scale": IP_SCALE}),
                    **({} if off == "freeu" else {"freeu": FREEU}),
                    **({"lora_weights": {"style": 0.0}} if off == "lora" else {"cross_attention_kwargs": {"scale": LORA_SCALE}}))
    assert _diff(got, want) <= TOL
