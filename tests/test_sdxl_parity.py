"""SDXL parity with diffusers: same tiny weights, same inputs, same noise -> the same image.

Two tiny SDXL-shaped pipelines (diffusers' own test architecture with the real CLIP vocabulary):

* ``lcm``: LCM-SDXL (a UNet with ``time_cond_proj_dim``, LCMScheduler), exported with a tiny TAESD
  as the alternative VAE;
* ``base``: SDXL base (EulerDiscreteScheduler, classifier-free guidance) with two LoRAs fused at
  export, as users run LCM-LoRA SDXL: an LCM-LoRA-like UNet LoRA in kohya format and a style LoRA
  (diffusers/PEFT format) on the UNet and *both* text encoders. The reference is diffusers with the
  same LoRAs loaded as adapters (not fused), so every ``base`` case is also a fused-LoRA parity check.

fp32 bundles: max abs difference of the 0-1 images at most 1e-4, against
``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentrt
from latentrt.runtime.random import TorchGeneratorNoise

TOL = 1e-4
PROMPT = "a photograph of an astronaut riding a horse"
MICRO = dict(original_size=(512, 300), crops_coords_top_left=(8, 16), target_size=(100, 200))


def _export(pipe, out, **kw):
    from latentrt.export.bundle import export_bundle

    export_bundle(None, out, pipe=pipe, check=False, progress=lambda *_: None, **kw)
    return latentrt.load(out)


def _save_loras(pipe, folder) -> list:
    """(path, weight) of an LCM-LoRA-like UNet LoRA (kohya keys) and a style LoRA on the UNet and both
    text encoders (PEFT keys; text_encoder_2 ones added here, as SDXL LoRA files carry them)."""
    from safetensors.torch import load_file, save_file

    from latentrt.export.tiny import TEXT_LORA_TARGETS, _lora_pairs, save_tiny_lora

    lcm_lora = save_tiny_lora(folder / "lcm-lora.safetensors", pipe, fmt="kohya", text_encoder=False, seed=1)
    style = save_tiny_lora(folder / "style.safetensors", pipe, fmt="peft", seed=2)
    sd = load_file(str(style))
    te2 = pipe.text_encoder_2
    prefix = "" if hasattr(te2, "text_model") else "text_model."
    for name, down, up in _lora_pairs(te2, TEXT_LORA_TARGETS, 4, torch.Generator().manual_seed(3), 0.2):
        sd[f"text_encoder_2.{prefix}{name}.lora_A.weight"] = down.contiguous()
        sd[f"text_encoder_2.{prefix}{name}.lora_B.weight"] = up.contiguous()
    save_file(sd, str(style))
    return [(str(lcm_lora), 1.0), (str(style), 0.7)]


def _img2img(pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ref = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    from latentrt.export.tiny import tiny_sdxl_pipeline

    from latentrt.export.tiny import tiny_taesd

    ref = tiny_sdxl_pipeline(0, lcm=True)
    ref.set_progress_bar_config(disable=True)
    return ref, _img2img(ref), _export(ref, tmp_path_factory.mktemp("sdxl") / "lcm", tiny_vae=tiny_taesd())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from latentrt.export.tiny import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("sdxl")
    ref = tiny_sdxl_pipeline(1)
    ref.set_progress_bar_config(disable=True)
    loras = _save_loras(ref, folder)
    ours = _export(ref, folder / "base", loras=loras)  # fuses into a copy; ref keeps its weights
    for i, (path, _) in enumerate(loras):
        ref.load_lora_weights(path, adapter_name=f"l{i}")
    ref.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
    return ref, _img2img(ref), ours


def _run(pipe, seed, torch_ref: bool, **kw):
    kw.setdefault("prompt", PROMPT)
    g = torch.Generator("cpu").manual_seed(seed) if torch_ref else TorchGeneratorNoise(seed)
    return pipe(**kw, generator=g, output_type="np").images


def _assert_close(got, want):
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= TOL, f"max abs image difference {err:.3g} > {TOL}"
    assert float(want.std()) > 1e-2  # not a trivially constant image


LCM_TXT2IMG = {
    "1-step": dict(num_inference_steps=1),
    "4-steps-guidance-8": dict(num_inference_steps=4, guidance_scale=8.0),
    "batch2x2": dict(prompt=["a red cat", "a blue dog on a hill"], num_images_per_prompt=2, num_inference_steps=2),
    "non-square-micro": dict(height=64, width=96, num_inference_steps=3, **MICRO),
}
LCM_IMG2IMG = {
    "4-steps-strength-0.5": dict(num_inference_steps=4, strength=0.5),
    "batch2-strength-0.8": dict(prompt=["a", "b"], num_inference_steps=4, strength=0.8, guidance_scale=3.0),
}
BASE_TXT2IMG = {
    "no-cfg": dict(num_inference_steps=2, guidance_scale=1.0),
    "cfg-zeros-negative": dict(num_inference_steps=3, guidance_scale=5.0),
    "cfg-negative-prompts": dict(num_inference_steps=2, guidance_scale=7.0, negative_prompt="blurry",
                                 prompt_2="oil painting", negative_prompt_2="low quality"),
    # diffusers lays the time ids out as [neg, pos] * batch: with negative sizes this is visible
    "batch2x2-negative-micro": dict(prompt=["a red cat", "a dog"], num_images_per_prompt=2, num_inference_steps=2,
                                    negative_prompt=["x", "y"], negative_original_size=(32, 32),
                                    negative_crops_coords_top_left=(4, 4), negative_target_size=(64, 48)),
    "non-square-micro-rescale": dict(height=64, width=96, num_inference_steps=2, guidance_rescale=0.7, **MICRO),
    "clip-skip": dict(num_inference_steps=2, clip_skip=1, negative_prompt="blurry"),
    "ancestral": dict(num_inference_steps=3, scheduler="EulerAncestralDiscreteScheduler"),
    "denoising-end": dict(num_inference_steps=4, denoising_end=0.6),
}
BASE_IMG2IMG = {
    "strength-0.5": dict(num_inference_steps=4, strength=0.5),
    "batch2-negative-micro": dict(prompt=["a", "b"], num_inference_steps=3, strength=0.8, guidance_scale=6.0,
                                  negative_original_size=(20, 20), negative_target_size=(40, 40), **MICRO),
}


@pytest.mark.parametrize("case", list(LCM_TXT2IMG))
def test_lcm_sdxl_txt2img(case, lcm):
    ref, _, ours = lcm
    kw = LCM_TXT2IMG[case]
    _assert_close(_run(ours, 3, False, **kw), _run(ref, 3, True, **kw))


@pytest.mark.parametrize("case", list(LCM_IMG2IMG))
def test_lcm_sdxl_img2img(case, lcm, rgb_image):
    _, ref, ours = lcm
    kw = dict(LCM_IMG2IMG[case], image=rgb_image)
    _assert_close(_run(ours, 4, False, **kw), _run(ref, 4, True, **kw))


@pytest.mark.parametrize("case", list(BASE_TXT2IMG))
def test_sdxl_txt2img(case, base):
    ref, _, ours = base
    kw = dict(BASE_TXT2IMG[case])
    if "scheduler" in kw:
        from diffusers import EulerAncestralDiscreteScheduler

        ref = type(ref)(**{**ref.components, "scheduler": EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)})
        ref.set_progress_bar_config(disable=True)
        _assert_close(_run(ours, 5, False, **kw), _run(ref, 5, True, **{k: v for k, v in kw.items() if k != "scheduler"}))
        return
    _assert_close(_run(ours, 5, False, **kw), _run(ref, 5, True, **kw))


@pytest.mark.parametrize("case", list(BASE_IMG2IMG))
def test_sdxl_img2img(case, base, rgb_image):
    _, ref, ours = base
    kw = dict(BASE_IMG2IMG[case], image=rgb_image)
    _assert_close(_run(ours, 6, False, **kw), _run(ref, 6, True, **kw))


def test_prompt_embeds_path(base):
    """Precomputed (pooled) embeddings give the same image as the prompt they came from."""
    ref, _, ours = base
    with torch.no_grad():
        pe, npe, ppe, nppe = ref.encode_prompt(PROMPT, negative_prompt="blurry", device="cpu")
    embeds = dict(prompt_embeds=pe.numpy(), negative_prompt_embeds=npe.numpy(), pooled_prompt_embeds=ppe.numpy(),
                  negative_pooled_prompt_embeds=nppe.numpy())
    got = ours(**embeds, num_inference_steps=2, generator=TorchGeneratorNoise(2), output_type="np").images
    want = _run(ref, 2, True, negative_prompt="blurry", num_inference_steps=2)
    _assert_close(got, want)


def test_lcm_lora_with_lcm_scheduler(base):
    """LCM-LoRA SDXL: the bundle's Euler config run as LCMScheduler, guidance 1 (no CFG)."""
    from diffusers import LCMScheduler

    ref, _, ours = base
    ref = type(ref)(**{**ref.components, "scheduler": LCMScheduler.from_config(ref.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=1.0)
    _assert_close(_run(ours, 8, False, scheduler="LCMScheduler", **kw), _run(ref, 8, True, **kw))


def test_fused_loras_change_the_image(base):
    from latentrt.export.tiny import tiny_sdxl_pipeline

    plain = tiny_sdxl_pipeline(1)
    plain.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2)
    assert float(np.abs(_run(base[2], 5, False, **kw) - _run(plain, 5, True, **kw)).max()) > 1e-2
    records = base[2].bundle.manifest.extra["loras"]
    assert [r["format"] for r in records] == ["kohya", "diffusers"]
    assert set(records[1]["layers"]) == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("img2img", [False, True])
def test_taesdxl(img2img, lcm, rgb_image):
    """TAESD for SDXL (madebyollin/taesdxl's architecture, tiny) as the alternative VAE."""
    from latentrt.export.tiny import tiny_taesd

    ref_t2i, ref_i2i, ours = lcm
    ref = type(ref_i2i if img2img else ref_t2i)(**{**ref_t2i.components, "vae": tiny_taesd()})
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, strength=0.6, image=rgb_image) if img2img else dict(num_inference_steps=2)
    _assert_close(_run(ours, 9, False, vae="tiny", **kw), _run(ref, 9, True, **kw))


def test_micro_conditioning_changes_the_image(base):
    """The parity cases above would not catch ignored time ids if they did not matter: they do."""
    _, _, ours = base
    a = _run(ours, 5, False, num_inference_steps=2)
    b = _run(ours, 5, False, num_inference_steps=2, **MICRO)
    assert float(np.abs(a - b).max()) > 1e-3


def test_manifest_and_specs(lcm):
    m = lcm[2].bundle.manifest
    assert m.pipeline == "sdxl"
    assert set(m.components) == {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder",
                                 "tiny_vae_decoder", "tiny_vae_encoder"}
    unet = m.components["unet"].spec
    assert [s.name for s in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids",
                                             "timestep_cond"]
    assert unet.inputs[2].shape == ("B", 77, 64) and unet.inputs[4].shape == ("B", 6)
    te2 = m.components["text_encoder_2"].spec
    assert [s.name for s in te2.outputs] == ["hidden_states", "text_embeds"]
    assert te2.outputs[0].shape == (4, "B", 77, 32)  # embeddings + 3 of the 4 layers (SDXL never reads the last)
    k = m.constants
    assert (k["vae_scaling_factor"], k["time_ids_dim"], k["is_lcm"], k["vae_force_upcast"]) == (0.13025, 6, True, True)
    assert (lcm[2].bundle.path / "tokenizer_2").is_dir()


def test_bad_inputs(base):
    _, _, ours = base
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=np.zeros((1, 77, 64), np.float32), num_inference_steps=1)
    with pytest.raises(ValueError, match="clip_skip must be an integer in"):
        ours(PROMPT, num_inference_steps=1, clip_skip=7)
    with pytest.raises(ValueError, match="original_size must be a pair"):
        ours(PROMPT, num_inference_steps=1, original_size=512)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries"):
        ours(["a", "b"], num_inference_steps=1, negative_prompt=["x"])
    with pytest.raises(ValueError, match="not supported with LCMScheduler"):
        ours(PROMPT, num_inference_steps=2, denoising_end=0.5, scheduler="LCMScheduler")
