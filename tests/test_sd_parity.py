"""Parity with diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on tiny models.

Same weights, same inputs, same noise (torch.Generator vs TorchGeneratorNoise), fp32 bundle: the max
abs difference of the 0-1 images is at most 1e-4. The cases cover every runtime scheduler, strengths
0.3 / 0.75 / 1.0, guidance 1.0 and 7.5 with a negative prompt, guidance_rescale, batch 2, two images
per prompt, non-square sizes, DDIM eta 0 and 1, and epsilon (SD1.5-like, PNDM) and v-prediction
(SD2-like, DDIM) models - a covering set, not the full cross product.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import latentrt
from latentrt.runtime.random import TorchGeneratorNoise

TOL = 1e-4
PROMPT = "a photograph of an astronaut riding a horse"
NEG = "blurry, low quality"

# name -> (diffusers class, extra config); our runtime takes the same name (or the +karras alias)
SCHEDULERS = {
    "PNDMScheduler": ("PNDMScheduler", {}),
    "DDIMScheduler": ("DDIMScheduler", {}),
    "EulerDiscreteScheduler": ("EulerDiscreteScheduler", {}),
    "EulerAncestralDiscreteScheduler": ("EulerAncestralDiscreteScheduler", {}),
    "DPMSolverMultistepScheduler": ("DPMSolverMultistepScheduler", {}),
    "DPMSolverMultistepScheduler+karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "LCMScheduler": ("LCMScheduler", {}),
}

TXT2IMG = {
    "pndm-default-neg": dict(num_inference_steps=6, negative_prompt=NEG),
    "ddim-eta0": dict(scheduler="DDIMScheduler", num_inference_steps=5, negative_prompt=NEG),
    "ddim-eta1": dict(scheduler="DDIMScheduler", num_inference_steps=5, eta=1.0, negative_prompt=NEG),
    "euler-g1": dict(scheduler="EulerDiscreteScheduler", num_inference_steps=5, guidance_scale=1.0),
    "euler-a-batch2": dict(scheduler="EulerAncestralDiscreteScheduler", num_inference_steps=4,
                           prompt=["a red cat", "a blue dog on a hill"], negative_prompt=["green", "yellow"]),
    "dpm-nonsquare-x2": dict(scheduler="DPMSolverMultistepScheduler", num_inference_steps=5, height=64, width=96,
                             num_images_per_prompt=2, negative_prompt=NEG),
    "dpm-karras-rescale": dict(scheduler="DPMSolverMultistepScheduler+karras", num_inference_steps=6,
                               guidance_rescale=0.7, negative_prompt=NEG),
    "lcm-g1": dict(scheduler="LCMScheduler", num_inference_steps=4, guidance_scale=1.0),
    "euler-timesteps": dict(scheduler="EulerDiscreteScheduler", timesteps=[901, 601, 301, 1], num_inference_steps=None),
}

IMG2IMG = {
    "pndm-s0.3": dict(num_inference_steps=10, strength=0.3, negative_prompt=NEG),
    "ddim-eta1-s0.75": dict(scheduler="DDIMScheduler", num_inference_steps=6, strength=0.75, eta=1.0),
    "euler-a-s1.0": dict(scheduler="EulerAncestralDiscreteScheduler", num_inference_steps=4, strength=1.0,
                         negative_prompt=NEG),
    "euler-g1-s0.3": dict(scheduler="EulerDiscreteScheduler", num_inference_steps=10, strength=0.3,
                          guidance_scale=1.0),
    "dpm-karras-s0.75-batch2": dict(scheduler="DPMSolverMultistepScheduler+karras", num_inference_steps=6,
                                    strength=0.75, prompt=["a red cat", "a blue dog"], negative_prompt=[NEG, "red"]),
    "dpm-s0.75": dict(scheduler="DPMSolverMultistepScheduler", num_inference_steps=4, strength=0.75),
    # LCM in an SD img2img pipeline: diffusers cuts the LCM schedule and sets the begin index
    "lcm-s0.75": dict(scheduler="LCMScheduler", num_inference_steps=4, strength=0.75, guidance_scale=1.0),
}

V_TXT2IMG = {
    "ddim-default-neg": dict(num_inference_steps=5, negative_prompt=NEG),
    "euler-a": dict(scheduler="EulerAncestralDiscreteScheduler", num_inference_steps=4),
    "dpm-karras-nonsquare": dict(scheduler="DPMSolverMultistepScheduler+karras", num_inference_steps=5,
                                 height=96, width=64),
    "pndm-g1": dict(scheduler="PNDMScheduler", num_inference_steps=5, guidance_scale=1.0),
}

V_IMG2IMG = {
    "ddim-eta1-s0.75": dict(num_inference_steps=6, strength=0.75, eta=1.0, negative_prompt=NEG),
    "euler-s0.3": dict(scheduler="EulerDiscreteScheduler", num_inference_steps=10, strength=0.3),
    "lcm-s1.0": dict(scheduler="LCMScheduler", num_inference_steps=2, strength=1.0, guidance_scale=1.0),
}


def _load_ref(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from latentrt.export.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def sd_ref(sd_dir):
    return _load_ref(sd_dir)


@pytest.fixture(scope="module")
def sd_bundle(sd_dir, sd_ref, tmp_path_factory):
    from latentrt.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "sd-fp32"
    export_bundle(sd_dir, out, pipe=sd_ref, check=False, progress=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def ours(sd_bundle):
    return latentrt.load(sd_bundle)


@pytest.fixture(scope="module")
def v_dir(tmp_path_factory):
    from latentrt.export.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd2-v", v_prediction=True)


@pytest.fixture(scope="module")
def v_ref(v_dir):
    return _load_ref(v_dir)


@pytest.fixture(scope="module")
def v_ours(v_dir, tmp_path_factory):
    """Exported from the folder (load_pipeline + recipe detection), not from a loaded pipeline."""
    from latentrt.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "sd2-v-fp32"
    export_bundle(v_dir, out, check=False, progress=lambda *_: None)
    return latentrt.load(out)


def _reference(ref, img2img: bool, scheduler: str | None):
    """A diffusers pipeline sharing ``ref``'s modules, with the scheduler swapped like our override."""
    import diffusers

    components = dict(ref.components)
    if scheduler is not None:
        cls_name, extra = SCHEDULERS[scheduler]
        components["scheduler"] = getattr(diffusers, cls_name).from_config(ref.scheduler.config, **extra)
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(ref, ours_pipe, kw, seed, image=None):
    kw = dict(kw)
    kw.setdefault("prompt", PROMPT)
    scheduler = kw.pop("scheduler", None)
    if kw.get("num_inference_steps", 1) is None:
        kw.pop("num_inference_steps")
    ref_kw = dict(kw)
    if image is not None:
        kw["image"] = ref_kw["image"] = image
    elif "strength" in kw:
        raise AssertionError("strength without image")
    want = _reference(ref, image is not None, scheduler)(**ref_kw, generator=torch.Generator().manual_seed(seed),
                                                         output_type="np").images
    got = ours_pipe(**kw, scheduler=scheduler, generator=TorchGeneratorNoise(seed), output_type="np").images
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= TOL, f"max abs image difference {err:.3g} > {TOL}"
    assert float(want.std()) > 1e-2  # not trivially constant images
    return got


@pytest.fixture
def rgb_image_64():
    from PIL import Image

    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8))


@pytest.mark.parametrize("case", list(TXT2IMG))
def test_txt2img_parity(case, sd_ref, ours):
    _compare(sd_ref, ours, TXT2IMG[case], 11)


@pytest.mark.parametrize("case", list(IMG2IMG))
def test_img2img_parity(case, sd_ref, ours, rgb_image_64):
    _compare(sd_ref, ours, IMG2IMG[case], 5, image=rgb_image_64)


@pytest.mark.parametrize("case", list(V_TXT2IMG))
def test_v_prediction_txt2img_parity(case, v_ref, v_ours):
    _compare(v_ref, v_ours, V_TXT2IMG[case], 3)


@pytest.mark.parametrize("case", list(V_IMG2IMG))
def test_v_prediction_img2img_parity(case, v_ref, v_ours, rgb_image_64):
    _compare(v_ref, v_ours, V_IMG2IMG[case], 9, image=rgb_image_64)


def test_manifest_records_kind_and_prediction_type(sd_bundle, v_ours):
    m = json.loads((sd_bundle / "latentrt.json").read_text())
    assert m["pipeline"] == "sd"
    assert m["constants"]["prediction_type"] == "epsilon" and m["constants"]["time_cond_proj_dim"] is None
    assert v_ours.bundle.manifest.pipeline == "sd"
    assert v_ours.bundle.constants["prediction_type"] == "v_prediction"
    assert v_ours.scheduler.name == "DDIMScheduler" and v_ours.scheduler.prediction_type == "v_prediction"
    assert v_ours.tokenizer.pad_token_id == 0  # SD2's "!" padding survives the export


def _clip_skip_embeds(pipe, prompt, clip_skip):
    """diffusers' clip_skip embeddings (its own path reads text_encoder.text_model, gone in transformers 5)."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        te = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
        return te.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def test_clip_skip_applies_to_the_prompt_only(sd_ref, ours):
    # with prompt_embeds and no negative prompt, diffusers encodes "" for the negative half (no clip_skip)
    want = sd_ref(prompt_embeds=_clip_skip_embeds(sd_ref, "a watercolor fox", 1), num_inference_steps=4,
                  generator=torch.Generator().manual_seed(2), output_type="np").images
    got = ours("a watercolor fox", clip_skip=1, num_inference_steps=4, generator=TorchGeneratorNoise(2),
               output_type="np").images
    assert float(np.abs(got - want).max()) <= TOL


def test_prompt_embeds_negative_embeds_and_latents(sd_ref, ours):
    with torch.no_grad():
        pos, neg = sd_ref.encode_prompt("a cat", "cpu", 1, True, negative_prompt="a dog")
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    want = sd_ref(prompt_embeds=pos, negative_prompt_embeds=neg, latents=latents, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(2), output_type="np").images
    got = ours(prompt_embeds=pos.numpy(), negative_prompt_embeds=neg.numpy(), latents=latents.numpy(),
               num_inference_steps=4, generator=TorchGeneratorNoise(2), output_type="np").images
    assert float(np.abs(got - want).max()) <= TOL
    # the same through the text path
    got2 = ours("a cat", negative_prompt="a dog", latents=latents.numpy(), num_inference_steps=4,
                generator=TorchGeneratorNoise(2), output_type="np").images
    assert float(np.abs(got2 - want).max()) <= TOL


def test_latent_output_and_callbacks(sd_ref, ours):
    seen = []

    def on_step_end(pipe, i, t, tensors):
        seen.append((i, float(t), sorted(tensors)))
        return {"latents": tensors["latents"] * 1.0}

    want = sd_ref("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(4),
                  output_type="latent").images.numpy()
    got = ours("a cat", num_inference_steps=3, generator=TorchGeneratorNoise(4), output_type="latent",
               callback_on_step_end=on_step_end).images
    assert got.shape == want.shape and float(np.abs(got - want).max()) < 1e-4
    plan = ours.plan(3)  # PNDM (skip_prk_steps) runs 3 + 1 UNet steps
    assert [s[0] for s in seen] == list(range(len(plan))) and seen[0][2] == ["latents", "prompt_embeds"]
    assert [s[1] for s in seen] == plan.timesteps.astype(float).tolist()
    # a callback that replaces the latents changes the result
    zeroed = ours("a cat", num_inference_steps=3, generator=TorchGeneratorNoise(4), output_type="latent",
                  callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"] * 0}).images
    assert float(np.abs(zeroed).max()) == 0.0


# -- bad input -----------------------------------------------------------------------------------


def test_unknown_scheduler_lists_the_known_ones(ours):
    with pytest.raises(ValueError, match="unknown scheduler 'HeunDiscreteScheduler'") as e:
        ours("a cat", scheduler="HeunDiscreteScheduler", num_inference_steps=2)
    for name in ("DDIMScheduler", "PNDMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler",
                 "DPMSolverMultistepScheduler+karras"):
        assert name in str(e.value)


@pytest.mark.parametrize("strength", [0, 0.0, -0.5, 1.5, True])
def test_strength_outside_0_1(ours, rgb_image_64, strength):
    with pytest.raises(ValueError, match=r"strength must be in the range \(0, 1\]"):
        ours("a cat", image=rgb_image_64, strength=strength, num_inference_steps=2)


def test_negative_prompt_list_length(ours):
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but there are 2 prompts"):
        ours(["a", "b"], negative_prompt=["x", "y", "z"], num_inference_steps=2)
    with pytest.raises(TypeError, match="negative_prompt must be a str or a list of str"):
        ours("a", negative_prompt=3, num_inference_steps=2)


def test_one_negative_prompt_for_every_prompt(ours):
    """diffusers refuses a str negative prompt with a list of prompts; here it applies to each."""
    kw = dict(num_inference_steps=2, generator=0, output_type="latent")
    one = ours(["a red cat", "a dog"], negative_prompt=NEG, **kw).images
    each = ours(["a red cat", "a dog"], negative_prompt=[NEG, NEG], **kw).images
    np.testing.assert_array_equal(one, each)


def test_other_bad_inputs(ours, rgb_image_64):
    with pytest.raises(ValueError, match="either negative_prompt or negative_prompt_embeds"):
        ours("a", negative_prompt="b", negative_prompt_embeds=np.zeros((1, 77, 32), np.float32),
             num_inference_steps=2)
    with pytest.raises(ValueError, match="negative_prompt_embeds have shape"):
        ours("a", negative_prompt_embeds=np.zeros((2, 77, 32), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        ours("a", guidance_rescale=2.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="latents .* is for text-to-image"):
        ours("a", image=rgb_image_64, latents=np.zeros((1, 4, 8, 12), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match="does not take custom timesteps"):
        ours("a", scheduler="PNDMScheduler", timesteps=[999, 500], num_inference_steps=None)


def test_generate_cli_uses_the_pipeline_defaults(sd_bundle, ours, tmp_path):
    """`latentrt generate` on an SD bundle: --scheduler and --negative-prompt reach the pipeline and
    the guidance default is the SD pipeline's (7.5), not LCM's."""
    from PIL import Image

    from latentrt.cli import main

    assert main(["generate", str(sd_bundle), "a cat", "--scheduler", "EulerAncestralDiscreteScheduler", "--steps", "3",
                 "--negative-prompt", "a dog", "--seed", "4", "-o", str(tmp_path), "--no-progress"]) == 0
    (png,) = tmp_path.glob("*.png")
    want = ours("a cat", scheduler="EulerAncestralDiscreteScheduler", num_inference_steps=3, negative_prompt="a dog",
                guidance_scale=7.5, generator=4, output_type="pil").images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(want))
    assert main(["generate", str(sd_bundle), "a cat", "--scheduler", "NoSuchScheduler", "-o", str(tmp_path),
                 "--no-progress"]) == 2


def test_detect_kind():
    """A UNet without time_cond_proj_dim is "sd"; one that is not plain text-to-image is refused."""
    from latentrt.export.recipes import UnsupportedModelError, detect_kind
    from latentrt.export.tiny import tiny_sd_pipeline, tiny_unet

    pipe = tiny_sd_pipeline()
    assert detect_kind(pipe).kind == "sd"
    pipe.unet = tiny_unet(time_cond_proj_dim=None, in_channels=9)  # an inpainting UNet
    with pytest.raises(UnsupportedModelError, match="not a plain SD1.x/SD2.x text-to-image UNet .*in_channels=9"):
        detect_kind(pipe)
