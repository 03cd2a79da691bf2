"""SDXL ControlNet and T2I-Adapter parity with diffusers (tiny weights, same noise, fp32 within 1e-4).

References: ``StableDiffusionXLControlNetPipeline`` on the LCM-SDXL UNet, ``StableDiffusionAdapterPipeline``
(plain SD UNet with classifier-free guidance; with ``adapter_conditioning_factor`` < 1 by SDXL's rule,
which diffusers' SD adapter pipeline lacks: the reference's UNet then drops the features from step
``int(N * factor)`` on) and ``StableDiffusionXLAdapterPipeline`` on the LCM-SDXL UNet.
"""

from __future__ import annotations

import contextlib

import pytest

from control_helpers import assert_changes, assert_close, control_picture, export, run, sd_components, sdxl_components

TOL = 1e-4
CTRL = control_picture(64, 96)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import (StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline,
                           StableDiffusionXLControlNetPipeline)

    from latentrt.export.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
    from latentrt.export.tiny_control import tiny_adapter, tiny_controlnet

    root = tmp_path_factory.mktemp("adapters")
    xl, sd = tiny_sdxl_pipeline(0, lcm=True), tiny_sd_pipeline(0)
    cn, ad, ad_xl = tiny_controlnet(xl.unet, 14), tiny_adapter(21), tiny_adapter(22, sdxl=True)
    return {
        "sdxl-controlnet": (StableDiffusionXLControlNetPipeline(**sdxl_components(xl), controlnet=cn),
                            export(xl, root / "xl-cn", controlnets=[cn])),
        "sd-adapter": (StableDiffusionAdapterPipeline(**sd_components(sd), adapter=ad),
                       export(sd, root / "sd-ad", adapter=ad)),
        "sdxl-adapter": (StableDiffusionXLAdapterPipeline(**sdxl_components(xl), adapter=ad_xl),
                         export(xl, root / "xl-ad", adapter=ad_xl)),
    }


@contextlib.contextmanager
def sd_adapter_factor(ref, n_steps: int, factor: float):
    """SDXL's ``adapter_conditioning_factor`` rule on diffusers' SD adapter pipeline: its UNet gets no
    adapter features from step ``int(n_steps * factor)`` on."""
    if factor == 1.0:
        yield
        return
    unet, calls = ref.unet, [0]
    forward = unet.forward

    def gated(*args, **kwargs):
        if calls[0] >= int(n_steps * factor):
            kwargs["down_intrablock_additional_residuals"] = None
        calls[0] += 1
        return forward(*args, **kwargs)

    unet.forward = gated
    try:
        yield
    finally:
        del unet.forward


CASES = {
    "sdxl-controlnet-lcm": ("sdxl-controlnet", dict(num_inference_steps=4, guidance_scale=8.0,
                                                   controlnet_conditioning_scale=0.9)),
    "sdxl-controlnet-lcm-guess-window": ("sdxl-controlnet", dict(num_inference_steps=4, guidance_scale=8.0,
                                                                guess_mode=True, control_guidance_start=0.3,
                                                                controlnet_conditioning_scale=2.0)),
    "sd-adapter-cfg": ("sd-adapter", dict(num_inference_steps=3, guidance_scale=7.5, adapter_conditioning_scale=0.8)),
    "sd-adapter-factor-0.5": ("sd-adapter", dict(num_images_per_prompt=2, num_inference_steps=4, guidance_scale=6.0,
                                                 adapter_conditioning_factor=0.5)),
    "sdxl-adapter-lcm": ("sdxl-adapter", dict(num_inference_steps=4, guidance_scale=8.0)),
    "sdxl-adapter-lcm-factor-0.6": ("sdxl-adapter", dict(num_inference_steps=4, guidance_scale=8.0,
                                                        adapter_conditioning_factor=0.6,
                                                        adapter_conditioning_scale=1.2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity(name, models):
    which, kw = CASES[name]
    ref, ours = models[which]
    adapter = "adapter" in which
    off = {**kw, ("adapter_conditioning_scale" if adapter else "controlnet_conditioning_scale"): 0.0}
    factor = kw.get("adapter_conditioning_factor", 1.0)
    ref_kw = dict(kw)
    if which == "sd-adapter":  # diffusers' SD adapter pipeline has no factor: the UNet hook applies it
        ref_kw.pop("adapter_conditioning_factor", None)
        off.pop("adapter_conditioning_factor", None)
    with sd_adapter_factor(ref, kw["num_inference_steps"], factor if which == "sd-adapter" else 1.0):
        want = run(ref, 0, True, image=CTRL, **ref_kw)
    assert_changes(want, run(ref, 0, True, image=CTRL, **off))
    got = run(ours, 0, False, control_image=CTRL, **kw)
    assert_close(got, want, TOL)
