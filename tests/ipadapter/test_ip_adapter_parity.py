"""IP-Adapter parity with diffusers (``load_ip_adapter`` from disk, same weights, same noise, fp32 within 1e-4).

LCM text-to-image and image-to-image with a plain IP-Adapter (no CFG: no negative image embedding); the
LCM UNet with a ControlNet and the IP-Adapter together (``StableDiffusionControlNetPipeline``, and the
ControlNet image-to-image pipeline, which runs CFG: the plain adapter's negative is zeros); SD with CFG
and a "plus" IP-Adapter (the negative is the encoder's output for a black image), text-to-image,
image-to-image and ``ip_adapter_image_embeds``; SDXL text-to-image. Scales 0.6 and 1.0. Each case first
shows that the image prompt changes diffusers' image (scale s against scale 0).
"""

from __future__ import annotations

import numpy as np
import pytest

from ip_helpers import assert_changes, assert_close, export, picture, reference, run, sibling

IP_IMAGE = picture(48, 40, seed=7)
INIT = picture(64, 64, seed=3)
CTRL = picture(64, 64, seed=9)


@pytest.fixture(scope="module")
def bundles(ip_bundles):
    return ip_bundles


@pytest.fixture(scope="module")
def refs(ip_parts):
    from diffusers import (LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline,
                           StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline,
                           StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

    lcm = reference(LatentConsistencyModelPipeline, ip_parts["lcm"], ip_parts["lcm_ip"])
    sd = reference(StableDiffusionPipeline, ip_parts["sd"], ip_parts["sd_ip"])
    return {"lcm": lcm, "lcm-img2img": sibling(LatentConsistencyModelImg2ImgPipeline, lcm),
            "lcm-cn": sibling(StableDiffusionControlNetPipeline, lcm, controlnet=ip_parts["cn"]),
            "lcm-cn-img2img": sibling(StableDiffusionControlNetImg2ImgPipeline, lcm, controlnet=ip_parts["cn"]),
            "sd": sd, "sd-img2img": sibling(StableDiffusionImg2ImgPipeline, sd)}


#: name -> (reference, bundle, scale, call arguments (diffusers' names; control_image is ours))
CASES = {
    "lcm-txt2img-0.6": ("lcm", "lcm", 0.6, dict(num_inference_steps=2, guidance_scale=8.0)),
    "lcm-txt2img-1.0-batch": ("lcm", "lcm", 1.0, dict(prompt=["a cat", "a dog"], num_images_per_prompt=2,
                                                       num_inference_steps=2, guidance_scale=6.0)),
    "lcm-img2img-0.6": ("lcm-img2img", "lcm", 0.6, dict(image=INIT, num_inference_steps=4, strength=0.6)),
    "lcm-img2img-1.0": ("lcm-img2img", "lcm", 1.0, dict(image=INIT, num_inference_steps=4, strength=0.8)),
    "lcm-controlnet-0.6": ("lcm-cn", "lcm", 0.6, dict(control_image=CTRL, num_inference_steps=3, guidance_scale=8.0)),
    "lcm-controlnet-img2img-cfg-1.0": ("lcm-cn-img2img", "lcm", 1.0,
                                       dict(image=INIT, control_image=CTRL, num_inference_steps=4, strength=0.75,
                                            guidance_scale=3.0, negative_prompt="ugly",
                                            controlnet_conditioning_scale=1.0)),
    "sd-cfg-plus-0.6": ("sd", "sd", 0.6, dict(num_inference_steps=3, guidance_scale=7.5, negative_prompt="blurry")),
    "sd-cfg-plus-1.0": ("sd", "sd", 1.0, dict(num_inference_steps=3, guidance_scale=7.5)),
    "sd-img2img-cfg-plus-0.6": ("sd-img2img", "sd", 0.6, dict(image=INIT, num_inference_steps=4, strength=0.75,
                                                               guidance_scale=5.0)),
    "sd-img2img-cfg-plus-1.0": ("sd-img2img", "sd", 1.0, dict(image=INIT, num_inference_steps=3, strength=0.9,
                                                               guidance_scale=7.5)),
}


def _theirs(kw: dict) -> dict:
    kw = dict(kw)
    if "control_image" in kw:
        if "image" in kw:
            kw["control_image"] = kw.pop("control_image")
        else:
            kw["image"] = kw.pop("control_image")
    return kw


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, bundles, refs):
    ref_name, bundle, scale, kw = CASES[case]
    ref = refs[ref_name]
    ref.set_ip_adapter_scale(0.0)
    without = run(ref, 0, True, ip_adapter_image=IP_IMAGE, **_theirs(kw))
    ref.set_ip_adapter_scale(scale)
    want = run(ref, 0, True, ip_adapter_image=IP_IMAGE, **_theirs(kw))
    assert_changes(want, without)
    got = run(bundles[bundle], 0, False, ip_adapter_image=IP_IMAGE, ip_adapter_scale=scale, **kw)
    assert_close(got, want)


def test_image_embeds_and_plain_calls(bundles, refs):
    """``ip_adapter_image_embeds`` (diffusers' own, negatives first with CFG) gives diffusers' image; a call
    without an image prompt on the same bundle is diffusers' plain image (the plain UNet graph)."""
    ref = refs["sd"]
    ref.set_ip_adapter_scale(0.8)
    embeds = ref.prepare_ip_adapter_image_embeds(IP_IMAGE, None, "cpu", 1, True)
    kw = dict(num_inference_steps=3, guidance_scale=7.5)
    want = run(ref, 1, True, ip_adapter_image_embeds=embeds, **kw)
    got = run(bundles["sd"], 1, False, ip_adapter_image_embeds=[embeds[0].detach().numpy()], ip_adapter_scale=0.8, **kw)
    assert_close(got, want)
    ref.set_ip_adapter_scale(0.0)  # diffusers at scale 0 skips the IP attention: the plain UNet
    plain = run(ref, 1, True, ip_adapter_image_embeds=embeds, **kw)
    assert_changes(want, plain)
    assert_close(run(bundles["sd"], 1, False, **kw), plain)
    assert_close(run(bundles["sd"], 1, False, ip_adapter_image_embeds=[embeds[0].detach().numpy()], ip_adapter_scale=0, **kw),
                 plain)


@pytest.mark.parametrize("case", ["txt2img-0.6", "img2img-1.0", "t2i-adapter-1.0"])
def test_sdxl(case, sdxl):
    """SDXL base (CFG) with a plain IP-Adapter on its 64-wide cross-attention: text-to-image, image-to-image
    (``StableDiffusionXLImg2ImgPipeline``) and with a T2I-Adapter (``StableDiffusionXLAdapterPipeline``: the
    adapter's residual UNet graph runs as its IP twin)."""
    ours, refs = sdxl
    kind, scale = case.rsplit("-", 1)
    scale = float(scale)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64)
    theirs, mine = kw, kw
    if kind == "img2img":
        kw = dict(kw, image=INIT, strength=0.7)
        theirs = mine = {k: v for k, v in kw.items() if k not in ("height", "width")}
    elif kind == "t2i-adapter":
        theirs, mine = {**kw, "image": CTRL}, {**kw, "control_image": CTRL}
    ref = refs[kind]
    ref.set_ip_adapter_scale(0.0)
    without = run(ref, 2, True, ip_adapter_image=IP_IMAGE, **theirs)
    ref.set_ip_adapter_scale(scale)
    want = run(ref, 2, True, ip_adapter_image=IP_IMAGE, **theirs)
    assert_changes(want, without)
    assert_close(run(ours, 2, False, ip_adapter_image=IP_IMAGE, ip_adapter_scale=scale, **mine), want)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from latentrt.export.tiny import tiny_sdxl_pipeline
    from latentrt.export.tiny_control import tiny_adapter
    from latentrt.export.tiny_ip_adapter import save_tiny_ip_adapter

    root = tmp_path_factory.mktemp("ip-sdxl")
    pipe, adapter = tiny_sdxl_pipeline(0), tiny_adapter(22, sdxl=True)
    weight = save_tiny_ip_adapter(root / "w", pipe.unet, seed=51)
    ours = export(pipe, root / "b", ip_adapter=weight, adapter=adapter)
    ref = reference(StableDiffusionXLPipeline, pipe, weight)
    return ours, {"txt2img": ref, "img2img": sibling(StableDiffusionXLImg2ImgPipeline, ref),
                  "t2i-adapter": sibling(StableDiffusionXLAdapterPipeline, ref, adapter=adapter)}


def test_controlnet_added_to_an_ip_adapter_bundle(ip_bundles, ip_parts, refs, tmp_path):
    """``latentrt export SRC --add-to BUNDLE --controlnet CN`` on an IP-Adapter bundle also exports the IP
    twin of the residual UNet graph: ControlNet + plus IP-Adapter + CFG equal diffusers'."""
    import shutil

    import latentrt
    from diffusers import StableDiffusionControlNetPipeline

    from latentrt.export.control_bundle import add_conditioning
    from latentrt.export.tiny_control import tiny_controlnet

    cn = tiny_controlnet(ip_parts["sd"].unet, 13)
    path = shutil.copytree(ip_bundles["sd"].bundle.path, tmp_path / "sd-ip")
    add_conditioning(path, [cn], src=ip_parts["sd"], check="off", progress=lambda *_: None)
    ref = sibling(StableDiffusionControlNetPipeline, refs["sd"], controlnet=cn)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, controlnet_conditioning_scale=1.0)
    ref.set_ip_adapter_scale(0.0)
    without = run(ref, 4, True, ip_adapter_image=IP_IMAGE, image=CTRL, **kw)
    ref.set_ip_adapter_scale(0.6)
    want = run(ref, 4, True, ip_adapter_image=IP_IMAGE, image=CTRL, **kw)
    assert_changes(want, without)
    got = run(latentrt.load(path), 4, False, ip_adapter_image=IP_IMAGE, ip_adapter_scale=0.6, control_image=CTRL, **kw)
    assert_close(got, want)
