"""IP-Adapter arguments that do not fit: clear errors (ValueError subclasses naming the fix), at export and
at run time; the CLI's --ip-adapter / --image-encoder; plain calls on an IP-Adapter bundle."""

from __future__ import annotations

import numpy as np
import pytest

from ip_helpers import assert_close, picture, run

IP_IMAGE = picture(40, 40, seed=7)


def test_image_prompt_on_a_bundle_without_ip_adapter(lcm_bundle):
    import latentrt
    from latentrt.runtime.pipelines.ip_adapter import IPAdapterInputError

    pipe = latentrt.load(lcm_bundle)
    for kw in ({"ip_adapter_image": IP_IMAGE}, {"ip_adapter_image_embeds": [np.zeros((1, 1, 24), np.float32)]}):
        with pytest.raises(IPAdapterInputError, match="has no IP-Adapter.*--ip-adapter"):
            pipe("a cat", num_inference_steps=1, **kw)


@pytest.mark.parametrize("scale", ["0.6", True, None, [0.5, 0.6], {"down": 0.5}, float("nan")])
def test_scale_that_is_not_a_number(ip_bundles, scale):
    from latentrt.runtime.pipelines.ip_adapter import IPAdapterInputError

    pipe = ip_bundles["lcm"]
    if scale is None:  # a scale without an image prompt
        with pytest.raises(IPAdapterInputError, match="ip_adapter_scale needs an image prompt"):
            pipe("a cat", num_inference_steps=1, ip_adapter_scale=0.5)
        return
    with pytest.raises(IPAdapterInputError, match="ip_adapter_scale must be"):
        pipe("a cat", num_inference_steps=1, ip_adapter_image=IP_IMAGE, ip_adapter_scale=scale)


def test_bad_image_prompts(ip_bundles):
    from latentrt.runtime.pipelines.ip_adapter import IPAdapterInputError

    sd, lcm = ip_bundles["sd"], ip_bundles["lcm"]
    with pytest.raises(IPAdapterInputError, match="either ip_adapter_image or ip_adapter_image_embeds"):
        lcm("a", num_inference_steps=1, ip_adapter_image=IP_IMAGE, ip_adapter_image_embeds=[np.zeros((1, 1, 24))])
    with pytest.raises(IPAdapterInputError, match="2 entries but the bundle has 1 IP-Adapter"):
        lcm("a", num_inference_steps=1, ip_adapter_image=[IP_IMAGE, IP_IMAGE])
    with pytest.raises(IPAdapterInputError, match=r"shape \(1, 1, 7\).*\(2 if classifier-free guidance else 1, 1, 24\)"):
        lcm("a", num_inference_steps=1, ip_adapter_image_embeds=[np.zeros((1, 1, 7))])
    # SD with CFG: the plus adapter's hidden states, negatives first
    with pytest.raises(IPAdapterInputError, match="uses classifier-free guidance, so pass 2"):
        sd("a", num_inference_steps=1, ip_adapter_image_embeds=[np.zeros((1, 1, 17, 48))])
    with pytest.raises(TypeError, match="unexpected keyword"):
        lcm("a", num_inference_steps=1, ip_adapter_images=IP_IMAGE)


def test_plain_calls_do_not_touch_the_ip_graphs(ip_bundles, ip_parts):
    """Without an image prompt an IP-Adapter bundle runs its plain UNet: diffusers' pipeline without an
    IP-Adapter, and no IP engine is created."""
    import latentrt
    from diffusers import LatentConsistencyModelPipeline

    pipe = latentrt.load(ip_bundles["lcm"].bundle.path)
    got = run(pipe, 3, False, num_inference_steps=2)
    assert not {"unet_ip_adapter", "image_encoder", "image_projection"} & set(pipe.engines)
    lcm = ip_parts["lcm"]
    parts = {k: v for k, v in lcm.components.items() if k not in ("image_encoder",)}
    ref = LatentConsistencyModelPipeline(**{**parts, "safety_checker": None, "requires_safety_checker": False})
    ref.set_progress_bar_config(disable=True)
    assert_close(got, run(ref, 3, True, num_inference_steps=2))


def test_export_source_errors(ip_parts, tmp_path):
    from latentrt.export.bundle import export_bundle
    from latentrt.export.ip_adapter import IPAdapterSourceError, resolve_source

    two = tmp_path / "two"
    two.mkdir()
    (two / "a.safetensors").write_bytes(b"")
    (two / "b.bin").write_bytes(b"")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    weight = ip_parts["lcm_ip"]
    (lonely / "ip.safetensors").write_bytes(weight.read_bytes())
    cases = [(tmp_path / "nope.safetensors", "no such file"), (two, "holds 2 weight files"),
             ("h94/IP-Adapter", "names the weight file"), (lonely, "no image_encoder folder.*--image-encoder"),
             (two / "b.bin", "pickles.*--allow-pickle")]
    for src, msg in cases:
        with pytest.raises(IPAdapterSourceError, match=msg):
            export_bundle(None, tmp_path / "out", pipe=ip_parts["lcm"], ip_adapter=src, check="off",
                          progress=lambda *_: None)
    from latentrt.export.ip_adapter import ip_adapter_plans, load_ip_adapter
    from latentrt.export.recipes import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="'unclip' bundle takes no image prompts"):
        ip_adapter_plans(ip_parts["lcm"], {}, [], weight, kind="unclip")
    from latentrt.export.tiny import tiny_sdxl_pipeline

    with pytest.raises(UnsupportedModelError, match="does not fit this pipeline's UNet"):  # SD-sized on SDXL
        load_ip_adapter(tiny_sdxl_pipeline(0), weight)

    shim = load_ip_adapter(ip_parts["lcm"], lonely, image_encoder=str(weight.parent / "image_encoder"))
    assert shim.image_encoder is not None and shim.unet is not ip_parts["lcm"].unet
    assert shim.unet.encoder_hid_proj is not None and ip_parts["lcm"].unet.encoder_hid_proj is None
    assert resolve_source("h94/IP-Adapter/models/ip-adapter_sd15.safetensors") == (
        "h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors")
    assert resolve_source(weight) == (str(weight.parent), "", weight.name)
    with pytest.raises(ValueError, match="--image-encoder.*--ip-adapter"):
        export_bundle(None, tmp_path / "out", pipe=ip_parts["lcm"], image_encoder=str(weight.parent / "image_encoder"),
                      check="off", progress=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_cli_passes_ip_adapter_options(monkeypatch, tmp_path):
    """``latentrt export SRC -o OUT --ip-adapter FILE --image-encoder DIR`` reaches export_bundle (the real
    export runs in the parity tests); --add-to refuses --ip-adapter."""
    import latentrt.export.bundle as bundle_mod
    from latentrt.cli import main

    seen = {}
    monkeypatch.setattr(bundle_mod, "export_bundle", lambda src, out, **kw: seen.update(src=src, out=out, **kw))
    assert main(["export", "SRC", "-o", str(tmp_path / "b"), "--ip-adapter", "w.safetensors",
                 "--image-encoder", "enc"]) == 0
    assert seen["ip_adapter"] == "w.safetensors" and seen["image_encoder"] == "enc"
    with pytest.raises(SystemExit, match="--ip-adapter"):
        main(["export", "SRC", "--add-to", str(tmp_path), "--controlnet", "cn", "--ip-adapter", "w.safetensors"])


def test_generate_cli_ip_image(ip_bundles, tmp_path):
    """``latentrt generate BUNDLE PROMPT --ip-image FILE --ip-scale S`` is the pipeline call with that image
    prompt (and records it in the PNG's settings)."""
    import json

    from PIL import Image

    from latentrt.cli import main

    IP_IMAGE.save(tmp_path / "ip.png")
    bundle = ip_bundles["lcm"].bundle.path
    assert main(["generate", str(bundle), "a cat", "--steps", "2", "--seed", "5", "--ip-image", str(tmp_path / "ip.png"),
                 "--ip-scale", "0.6", "--no-progress", "-o", str(tmp_path / "out")]) == 0
    png = Image.open(tmp_path / "out" / "image-5-0.png")
    assert json.loads(png.text["latentrt"])["ip_adapter_scale"] == 0.6
    want = ip_bundles["lcm"]("a cat", num_inference_steps=2, generator=5, ip_adapter_image=Image.open(tmp_path / "ip.png"),
                             ip_adapter_scale=0.6).images[0]
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(want))
    plain = ip_bundles["lcm"]("a cat", num_inference_steps=2, generator=5).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want))
    with pytest.raises(SystemExit, match="--ip-scale needs --ip-image"):
        main(["generate", str(bundle), "a cat", "--ip-scale", "0.6", "-o", str(tmp_path / "out2")])
