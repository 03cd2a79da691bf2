"""ControlNet parity with diffusers on the tiny SD-family pipelines: same weights, same noise.

References: ``StableDiffusionControlNetPipeline`` (LCM UNet + LCMScheduler; plain SD UNet + PNDM and
classifier-free guidance, guess mode on and off; control_guidance_start/end; two ControlNets with
per-net scales) and ``StableDiffusionControlNetImg2ImgPipeline`` (on the LCM UNet, where diffusers
runs CFG and no guidance embedding). fp32 bundles within 1e-4, fp16 within 2e-2.
"""

from __future__ import annotations

import numpy as np
import pytest

from control_helpers import assert_changes, assert_close, control_picture, export, run, sd_components

TOL = {"fp32": 1e-4, "fp16": 2e-2}


@pytest.fixture(scope="module")
def bundles(sd_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    lcm, sd, cn = sd_parts["lcm"], sd_parts["sd"], sd_parts["cn"]
    return {
        "lcm": export(lcm, root / "lcm", controlnets=[cn[0]]),
        "lcm-fp16": export(lcm, root / "lcm16", controlnets=[cn[0]], precision="fp16"),
        "lcm-multi": export(lcm, root / "lcm2", controlnets=cn),
        "sd": export(sd, root / "sd", controlnets=[sd_parts["cn_sd"]]),
    }


def _reference(cls, parts, base: str, controlnet):
    return cls(**sd_components(parts[base]), controlnet=controlnet)


@pytest.fixture(scope="module")
def refs(sd_parts):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    cn = sd_parts["cn"]
    return {
        "lcm": _reference(StableDiffusionControlNetPipeline, sd_parts, "lcm", cn[0]),
        "lcm-multi": _reference(StableDiffusionControlNetPipeline, sd_parts, "lcm", list(cn)),
        "sd": _reference(StableDiffusionControlNetPipeline, sd_parts, "sd", sd_parts["cn_sd"]),
        "lcm-img2img": _reference(StableDiffusionControlNetImg2ImgPipeline, sd_parts, "lcm", cn[0]),
    }


CTRL = control_picture(64, 96)
CTRL2 = control_picture(64, 96, seed=9)
INIT = control_picture(64, 96, seed=3)

#: name -> (reference, bundle, call arguments, the argument that switches the control off in diffusers)
CASES = {
    "lcm-4-steps": ("lcm", "lcm", dict(image=CTRL, num_inference_steps=4, guidance_scale=8.0,
                                       controlnet_conditioning_scale=0.8)),
    "lcm-guess-mode": ("lcm", "lcm", dict(image=CTRL, num_inference_steps=3, guidance_scale=8.0, guess_mode=True)),
    "lcm-window": ("lcm", "lcm", dict(image=CTRL, num_inference_steps=4, guidance_scale=2.0,
                                      control_guidance_start=0.25, control_guidance_end=0.75)),
    "lcm-batch-size": ("lcm", "lcm", dict(prompt=["a red cat", "a dog"], num_images_per_prompt=2, image=CTRL,
                                          num_inference_steps=2, height=48, width=64, guidance_scale=7.0)),
    "sd-cfg": ("sd", "sd", dict(image=CTRL, num_inference_steps=3, guidance_scale=7.5, negative_prompt="blurry",
                                controlnet_conditioning_scale=1.5)),
    "sd-cfg-guess-mode": ("sd", "sd", dict(image=CTRL, num_inference_steps=3, guidance_scale=7.5, guess_mode=True,
                                           controlnet_conditioning_scale=1.2)),
    "sd-no-cfg-batch": ("sd", "sd", dict(prompt=["a", "b"], image=[CTRL, CTRL2], num_inference_steps=2,
                                         guidance_scale=1.0)),
    "multi-per-net-scales": ("lcm-multi", "lcm-multi", dict(image=[CTRL, CTRL2], num_inference_steps=4, guidance_scale=6.0,
                                                           controlnet_conditioning_scale=[0.7, 1.3],
                                                           control_guidance_end=[1.0, 0.5])),
    "img2img-lcm-unet-cfg": ("lcm-img2img", "lcm", dict(image=INIT, control_image=CTRL, num_inference_steps=4,
                                                        strength=0.75, guidance_scale=3.0, negative_prompt="ugly")),
    "fp16-lcm": ("lcm", "lcm-fp16", dict(image=CTRL, num_inference_steps=4, guidance_scale=8.0)),
}


def _ours(kw: dict, img2img: bool) -> dict:
    kw = dict(kw)
    if not img2img:
        kw["control_image"] = kw.pop("image")
    return kw


def _off(kw: dict) -> dict:
    """The same call with every ControlNet's scale at 0 (diffusers then adds zero residuals)."""
    n = len(kw["image"]) if isinstance(kw.get("image"), list) and isinstance(kw.get("controlnet_conditioning_scale"), list) else 1
    return {**kw, "controlnet_conditioning_scale": [0.0] * n if n > 1 else 0.0}


@pytest.mark.parametrize("name", list(CASES))
def test_controlnet_parity(name, bundles, refs):
    ref_name, bundle_name, kw = CASES[name]
    img2img = ref_name.endswith("img2img")
    want = run(refs[ref_name], 0, True, **kw)
    assert_changes(want, run(refs[ref_name], 0, True, **_off(kw)))
    got = run(bundles[bundle_name], 0, False, **_ours(kw, img2img))
    assert_close(got, want, TOL["fp16" if "fp16" in bundle_name else "fp32"])


def test_no_control_image_runs_the_plain_unet(bundles, sd_parts):
    """Without a control image a ControlNet bundle never touches its ControlNet graphs and gives the
    LCM pipeline's image."""
    import latentrt

    pipe = latentrt.load(bundles["lcm"].bundle.path)  # a fresh pipeline: no engine created yet
    plain = run(pipe, 1, False, num_inference_steps=2, guidance_scale=7.5)
    assert "controlnet_0" not in pipe.engines and "unet_controlnet" not in pipe.engines
    from diffusers import LatentConsistencyModelPipeline

    ref = LatentConsistencyModelPipeline(**sd_components(sd_parts["lcm"]))
    assert_close(plain, run(ref, 1, True, num_inference_steps=2, guidance_scale=7.5), TOL["fp32"])
