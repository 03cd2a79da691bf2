"""The CLI (export --controlnet / --add-to, generate --control-image ... with PNG metadata), adding a
ControlNet to an existing bundle without re-exporting its UNet, and bad conditioning input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from control_helpers import assert_close, control_picture, run, sd_components

import latentrt
from latentrt.runtime.pipelines.conditioning import ControlInputError


def cli(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "latentrt.cli", *map(str, args)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sd_parts):
    """The tiny LCM and its two ControlNets saved as diffusers folders, as users pass them."""
    from latentrt.export.tiny import save_tiny_lcm

    root = tmp_path_factory.mktemp("cli")
    src = save_tiny_lcm(root / "lcm")
    nets = []
    for k, cn in enumerate(sd_parts["cn"]):
        cn.save_pretrained(str(root / f"cn{k}"), safe_serialization=True)
        nets.append(root / f"cn{k}")
    return root, src, nets


@pytest.fixture(scope="module")
def grown_bundle(folders):
    """A plain LCM bundle, then a first ControlNet added (with SRC), then a second one (without)."""
    root, src, nets = folders
    out = root / "bundle"
    cli("export", src, "-o", out, "--check", "quick")
    unet_sha = json.loads((out / "latentrt.json").read_text())["components"]["unet"]["files"]
    cli("export", src, "--add-to", out, "--controlnet", nets[0])
    cli("export", "--add-to", out, "--controlnet", nets[1])
    return out, unet_sha


def test_add_to_keeps_the_unet_and_matches_diffusers_multi_controlnet(grown_bundle, sd_parts):
    from diffusers import StableDiffusionControlNetPipeline

    out, unet_sha = grown_bundle
    m = json.loads((out / "latentrt.json").read_text())
    assert m["components"]["unet"]["files"] == unet_sha
    assert [c["component"] for c in m["extra"]["control"]["controlnets"]] == ["controlnet_0", "controlnet_1"]
    ref = StableDiffusionControlNetPipeline(**sd_components(sd_parts["lcm"]), controlnet=list(sd_parts["cn"]))
    imgs = [control_picture(64, 64), control_picture(64, 64, seed=8)]
    kw = dict(num_inference_steps=2, guidance_scale=5.0, controlnet_conditioning_scale=[0.6, 1.1])
    want = run(ref, 3, True, image=imgs, **kw)
    assert_close(run(latentrt.load(out), 3, False, control_image=imgs, **kw), want, 1e-4)


def test_generate_cli_with_two_control_images_and_canny(grown_bundle, tmp_path):
    from PIL import Image

    out, _ = grown_bundle
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    control_picture(64, 64).save(a)
    control_picture(64, 64, seed=8).save(b)
    cli("generate", out, "a cat", "--control-image", a, "--control-image", b, "--control-scale", "0.8,1.2",
        "--control-end", "0.5,1", "--guess-mode", "--canny", "50,150", "--steps", "2", "--no-progress",
        "-o", tmp_path / "out")
    png, = (tmp_path / "out").glob("*.png")
    meta = json.loads(Image.open(png).text["latentrt"])
    assert meta["control_image"] == [str(a), str(b)] and meta["canny"] == "50,150"
    assert meta["controlnet_conditioning_scale"] == [0.8, 1.2] and meta["control_guidance_end"] == [0.5, 1.0]
    assert meta["guess_mode"] is True


def test_add_to_without_src_needs_the_residual_unet(folders, lcm_bundle, tmp_path):
    import shutil

    from latentrt.export.control_bundle import add_conditioning

    root, _, nets = folders
    copy = tmp_path / "plain"
    shutil.copytree(lcm_bundle, copy)
    with pytest.raises(ValueError, match="pass the pipeline it was exported from as SRC"):
        add_conditioning(copy, [nets[0]], progress=lambda *_: None)


@pytest.fixture(scope="module")
def pipes(grown_bundle, lcm_bundle):
    return latentrt.load(grown_bundle[0]), latentrt.load(lcm_bundle)


CTRL = control_picture(64, 64)
BAD = {
    "no-controlnet-in-bundle": ("plain", dict(control_image=CTRL), "has no ControlNet or T2I-Adapter"),
    "one-image-for-two-nets": ("multi", dict(control_image=CTRL), "has 2 ControlNets .* but 1 control image"),
    "three-scales-for-two-nets": ("multi", dict(control_image=[CTRL, CTRL], controlnet_conditioning_scale=[1, 1, 1]),
                                  "has 3 values but the bundle has 2 ControlNet"),
    "start-not-before-end": ("multi", dict(control_image=[CTRL, CTRL], control_guidance_start=0.6,
                                           control_guidance_end=0.4), r"start \(0.6\) must be smaller"),
    "array-size-disagrees": ("multi", dict(control_image=[np.zeros((48, 64, 3), np.uint8)] * 2, height=64, width=64),
                             "is 48x64 .* but this call generates 64x64"),
    "init-and-control-sizes": ("multi", dict(image=control_picture(48, 64), control_image=[CTRL, CTRL], strength=1.0),
                               "control image is 64x64 .* but the init image is 48x64"),
    "scale-without-image": ("multi", dict(controlnet_conditioning_scale=0.5), "need.* control_image"),
    "adapter-args-on-controlnets": ("multi", dict(control_image=[CTRL, CTRL], adapter_conditioning_scale=0.5),
                                    "are for T2I-Adapters"),
    "unknown-argument": ("multi", dict(control_images=[CTRL, CTRL]), "unexpected keyword"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_control_input(name, pipes):
    which, kw, message = BAD[name]
    pipe = pipes[0] if which == "multi" else pipes[1]
    with pytest.raises((ControlInputError, TypeError), match=message):
        pipe("a cat", num_inference_steps=1, output_type="np", **kw)


def test_torch_backend_runs_the_control_components(grown_bundle):
    """The torch backend builds controlnet_N / unet_controlnet from the sources the manifest records."""
    out, _ = grown_bundle
    imgs = [control_picture(64, 64), control_picture(64, 64, seed=8)]
    kw = dict(control_image=imgs, num_inference_steps=2, generator=0, output_type="np", guess_mode=True)
    want = latentrt.load(out)("a cat", **kw).images
    assert_close(latentrt.load(out, backend="torch")("a cat", **kw).images, want, 1e-4)
