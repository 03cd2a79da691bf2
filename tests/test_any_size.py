"""Every image size diffusers renders, from one dynamic graph per component.

diffusers renders any multiple of the VAE factor (8): when a latent side is not a multiple of the
UNet's overall upsampling factor, its up blocks take their output sizes from the skip tensors. The
exported UNets take that branch for every size (``wrappers.explicit_upsample_sizes``), so the
pipelines match diffusers (fp32, same noise, 1e-4 on the 0-1 images) at sizes such as 40x56 (latents
5x7: odd on both sides) txt2img and img2img. The latent upscaler's K-UNet cannot (its ``KUpsample2D``
takes no output size): its bundle accepts exactly the sizes diffusers renders. Then: the range a
bundle records and the messages that refuse sizes outside it, old bundles, TensorRT profile shapes.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import latentrt
from latentrt.runtime.random import TorchGeneratorNoise
from latentrt.sizes import DEFAULT_MAX_BATCH, SizeRange, bundle_size_limits

TOL = 1e-4
H, W = 40, 56  # multiples of 8, latents 5x7: not a multiple of any tiny UNet's factor (2 or 4)


def photo(h, w, seed=1):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), x * y], -1) * 0.4 + 0.5
    return Image.fromarray((np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1) * 255).astype(np.uint8))


def _close(ours, ref, seed, **kw):
    kw.setdefault("prompt", "a photograph of an astronaut riding a horse")
    want = ref(**kw, generator=torch.Generator().manual_seed(seed), output_type="np").images
    got = ours(**kw, generator=TorchGeneratorNoise(seed), output_type="np").images
    assert got.shape == want.shape and np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= TOL, f"max abs image difference {err:.3g} > {TOL}"
    assert float(want.std()) > 1e-2  # not a trivially constant image
    return got


def _export(out, src=None, **kw):
    from latentrt.export.bundle import export_bundle

    export_bundle(src, out, progress=lambda *_: None, **kw)
    return out


def _with_components(ref, cls_name, **swap):
    import diffusers

    pipe = getattr(diffusers, cls_name)(**{**ref.components, **swap})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the graphs ---------------------------------------------------------------------------------

def _ancestor_ops(model, name, seen=None) -> set[str]:
    producers = {o: n for n in model.graph.node for o in n.output}
    ops, todo, seen = set(), [name], set()
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        ops.add(node.op_type)
        todo += [i for i in node.input if i]
    return ops


def test_unet_resize_sizes_come_from_shape_ops(lcm_bundle):
    """Every Resize of the exported UNet reads an output size computed from a tensor's shape (no
    constant scale factor), so one graph serves every latent size."""
    import onnx

    model = onnx.load(str(lcm_bundle / "unet" / "model.onnx"), load_external_data=False)
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resizes
    for n in resizes:
        assert len(n.input) == 4 and n.input[3], f"{n.name} has no sizes input: {list(n.input)}"
        assert "Shape" in _ancestor_ops(model, n.input[3]), f"{n.name}: its sizes do not come from a Shape op"


# -- parity at a size the UNet does not divide --------------------------------------------------

@pytest.fixture(scope="module")
def lcm(tiny_lcm_pipe, lcm_bundle):
    return tiny_lcm_pipe, _with_components(tiny_lcm_pipe, "LatentConsistencyModelImg2ImgPipeline"), \
        latentrt.load(lcm_bundle)


def test_lcm_txt2img_and_img2img(lcm):
    ref, ref_i2i, ours = lcm
    _close(ours, ref, 1, height=H, width=W, num_inference_steps=3)
    _close(ours, ref_i2i, 2, image=photo(H, W), num_inference_steps=4, strength=0.6)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """Plain SD with a three-level UNet (factor 4): 40x56 gives latents 5x7 -> 3x4 -> 2x2."""
    from latentrt.export.tiny import tiny_sd_pipeline, tiny_unet

    base = tiny_sd_pipeline(0)
    unet = tiny_unet(13, time_cond_proj_dim=None, block_out_channels=(32, 32, 64),
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    ref = _with_components(base, "StableDiffusionPipeline", unet=unet)
    out = _export(tmp_path_factory.mktemp("any-size") / "sd3", pipe=ref, check="quick")
    return ref, _with_components(ref, "StableDiffusionImg2ImgPipeline"), latentrt.load(out)


def test_sd_three_level_unet_txt2img_and_img2img(sd3):
    ref, ref_i2i, ours = sd3
    assert (ours.constants["size_multiple"], ours.constants["min_size"]) == (8, 32)
    _close(ours, ref, 3, height=H, width=W, num_inference_steps=3, guidance_scale=7.0, negative_prompt="blurry")
    _close(ours, ref, 4, height=48, width=40, num_inference_steps=2)  # latents 6x5: 6 divides by 2, not by 4
    _close(ours, ref_i2i, 5, image=photo(H, W), num_inference_steps=4, strength=0.7)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """LCM-SDXL with a tiny TAESD (its encoder and decoder at the same size)."""
    from latentrt.export.tiny import tiny_sdxl_pipeline, tiny_taesd

    ref = tiny_sdxl_pipeline(0, lcm=True)
    ref.set_progress_bar_config(disable=True)
    taesd = tiny_taesd()
    out = _export(tmp_path_factory.mktemp("any-size") / "sdxl", pipe=ref, tiny_vae=taesd, check="quick")
    return ref, taesd, latentrt.load(out)


def test_sdxl_txt2img_img2img_and_tiny_vae(sdxl):
    ref, taesd, ours = sdxl
    i2i = _with_components(ref, "StableDiffusionXLImg2ImgPipeline")
    _close(ours, ref, 6, height=H, width=W, num_inference_steps=2)
    _close(ours, i2i, 7, image=photo(H, W), num_inference_steps=4, strength=0.5)
    tiny = _with_components(ref, "StableDiffusionXLPipeline", vae=taesd)
    tiny_i2i = _with_components(ref, "StableDiffusionXLImg2ImgPipeline", vae=taesd)
    _close(lambda **kw: ours(vae="tiny", **kw), tiny, 8, height=H, width=W, num_inference_steps=2)
    _close(lambda **kw: ours(vae="tiny", **kw), tiny_i2i, 9, image=photo(H, W), num_inference_steps=4,
           strength=0.5)


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    from latentrt.export.tiny_unclip import tiny_unclip_img2img_pipeline, tiny_unclip_pipeline

    out = {}
    for name, make in (("t2i", tiny_unclip_pipeline), ("i2i", tiny_unclip_img2img_pipeline)):
        ref = make(0)
        ref.set_progress_bar_config(disable=True)
        out[name] = ref, latentrt.load(_export(tmp_path_factory.mktemp("any-size") / name, pipe=ref, check=False))
    return out


def test_unclip_text_to_image_and_variation(unclip):
    ref, ours = unclip["t2i"]
    _close(ours, ref, 10, height=H, width=W, num_inference_steps=3, prior_num_inference_steps=3, noise_level=100)
    ref, ours = unclip["i2i"]
    _close(ours, ref, 11, image=photo(48, 40), height=H, width=W, num_inference_steps=3, noise_level=100)


# -- what a bundle records; refusals --------------------------------------------------------------

def test_refusals_name_the_range_and_the_nearest_sizes(lcm):
    _, _, ours = lcm
    r = ours.size_range
    assert (r.multiple, r.min, r.max, r.max_batch) == (8, 16, 256, DEFAULT_MAX_BATCH)
    cases = {
        (44, 64): r"height=44 is not a multiple of 8; use 40 or 48$",
        (64, 320): r"width=320 px is above the sizes this bundle supports \(16 to 256 px per side in multiples of "
                   r"8\); use 256; re-export with `latentrt export --max-size N`",
        (8, 64): r"height=8 px is below the sizes this bundle supports \(16 to 256 px per side in multiples of 8\); "
                 r"use 16$",
        (-8, 64): r"height must be a positive integer; got -8",
        (64, 64.0): r"width must be a positive integer; got 64.0",
    }
    for (h, w), pattern in cases.items():
        with pytest.raises(ValueError, match=pattern):
            ours("a cat", height=h, width=w, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"this call makes 18 images .*more than the 16 this bundle supports "
                                         r"\(max_batch\); split the call, or re-export with `latentrt export "
                                         r"--max-batch N`"):
        ours(["a", "b"], num_images_per_prompt=9, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"height=264 px is above"):  # an image: refused before it is encoded
        ours("a cat", image=photo(264, 64), num_inference_steps=1)


def test_refused_before_any_engine_runs(lcm_bundle, monkeypatch):
    pipe = latentrt.load(lcm_bundle)

    def no_engine(component, **inputs):
        raise AssertionError(f"{component} ran")

    monkeypatch.setattr(pipe, "run", no_engine)
    for kw in (dict(height=4096, width=4096), dict(num_images_per_prompt=10000), dict(height=40, width=4)):
        with pytest.raises(ValueError):
            pipe("a cat", num_inference_steps=1, **kw)


def test_engine_profile_ranges_are_checked_first(lcm_bundle):
    """Engines built for a shape profile (TensorRT) carry H/W ranges: a size outside them is refused
    before any engine runs, with the range and the nearest sizes inside it."""
    from latentrt.spec import SpecError

    pipe = latentrt.load(lcm_bundle)
    pipe.engines["unet"].limits = {"B": (1, 2), "H": (32, 64), "W": (32, 128)}
    with pytest.raises(SpecError, match=r"H=96 is outside the unet engine's profile range \[32, 64\] \(px\); use 64, "
                                        r"or rebuild the engines"):
        pipe("a cat", height=96, width=64, num_inference_steps=1)
    out = pipe("a cat", height=40, width=120, num_inference_steps=1, output_type="np").images  # inside: runs
    assert out.shape == (1, 40, 120, 3)


def test_old_bundles_keep_their_rule(lcm_bundle, tmp_path):
    """A bundle exported before the range was recorded (its UNet traced on the divisible branch):
    size_multiple is the UNet's factor, no min/max/max_batch. It loads, and the old rule applies."""
    old = tmp_path / "old"
    shutil.copytree(lcm_bundle, old, ignore=shutil.ignore_patterns(".cache"))
    path = old / "latentrt.json"
    m = json.loads(path.read_text())
    for key in ("min_size", "max_size", "max_batch"):
        del m["constants"][key]
    m["constants"]["size_multiple"] = 16
    path.write_text(json.dumps(m))
    pipe = latentrt.load(old)
    assert not pipe.size_range.recorded
    with pytest.raises(ValueError, match=r"height=72 is not a multiple of 16, which this bundle's UNet needs \(its "
                                         r"latents are downsampled 2x\); use 64 or 80"):
        pipe("a cat", height=72, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"height=60 is not a multiple of 8; use 48 or 64"):
        pipe("a cat", height=60, width=64, num_inference_steps=1)
    assert pipe.default_size(4096, 1024) == (4096, 1024)  # no recorded maximum: not refused by the range
    pipe.check_batch(10000)
    assert pipe("a cat", height=64, width=96, num_inference_steps=1, output_type="np").images.shape == (1, 64, 96, 3)


def test_size_limits_from_default_trace_profile_and_flags():
    from latentrt.profiles import parse_profile

    k = {"size_multiple": 8, "min_size": 64, "default_height": 512, "default_width": 512}
    assert bundle_size_limits(k) == {"min_size": 64, "max_size": 2048, "max_batch": 16, "default_height": 512,
                                     "default_width": 512}
    assert bundle_size_limits(k, trace_size=768)["max_size"] == 3072
    prof = parse_profile({"name": "p", "dims": {"B": [1, 1, 4], "H": [256, 512, 1000], "W": [320, 512, 768]}})
    assert bundle_size_limits(k, profile=prof) == {"min_size": 256, "max_size": 1000, "max_batch": 4,
                                                   "default_height": 512, "default_width": 512}
    got = bundle_size_limits(k, profile=prof, max_size=1536, max_batch=2)
    assert (got["min_size"], got["max_size"], got["max_batch"]) == (256, 1536, 2)
    static = parse_profile({"name": "s", "dims": {"B": 1, "H": 768, "W": 768}})
    assert bundle_size_limits(k, profile=static)["default_height"] == 768  # the default moves inside the range
    up = {"size_multiple": 32, "min_size": 64, "max_size": 1024, "default_height": 512, "default_width": 512}
    assert bundle_size_limits(up)["max_size"] == 1024  # the upscaler's own maximum (input pixels)
    for bad, message in ((dict(max_size=1000 + 4), "multiple of 8"), (dict(max_size=32), "at least 64"),
                         (dict(max_batch=0), "max_batch must be a positive integer")):
        with pytest.raises(ValueError, match=message):
            bundle_size_limits(k, **bad)


def test_export_cli_records_the_range(tiny_lcm_dir, tmp_path, capsys):
    from latentrt.cli import main

    prof = tmp_path / "p.toml"
    prof.write_text('name = "p"\n[dims]\nB = [1, 1, 2]\nH = [32, 64, 96]\nW = [32, 64, 160]\n[precision]\n'
                    'default = "fp32"\n')
    out = tmp_path / "b"
    assert main(["export", str(tiny_lcm_dir), "-o", str(out), "--check", "off", "--profile", str(prof),
                 "--max-batch", "3"]) == 0
    k = json.loads((out / "latentrt.json").read_text())["constants"]
    assert (k["size_multiple"], k["min_size"], k["max_size"], k["max_batch"]) == (8, 32, 160, 3)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "sizes      32 to 160 px per side in multiples of 8, at most 3 images per call" in capsys.readouterr().out
    pipe = latentrt.load(out)
    with pytest.raises(ValueError, match=r"width=168 px is above .*\(32 to 160 px per side"):
        pipe("a cat", height=64, width=168, num_inference_steps=1)
    assert main(["export", str(tiny_lcm_dir), "-o", str(tmp_path / "c"), "--check", "off", "--max-size", "100"]) == 2
    assert "max_size must be a multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# -- TensorRT profiles (no TensorRT needed: shapes, warnings) ------------------------------------

def test_profile_shapes_for_sizes_the_unet_does_not_divide(lcm_bundle):
    from latentrt.components import upscaler_unet_spec
    from latentrt.manifest import read_manifest
    from latentrt.profiles import ProfileError, parse_profile

    spec = read_manifest(lcm_bundle).components["unet"].spec
    prof = parse_profile({"name": "odd", "dims": {"B": [1, 1, 3], "H": [40, 264, 1000], "W": [56, 520, 1000]},
                          "batch_multiplier": {"unet": 2}})
    s = prof.shapes_for(spec)["sample"]
    assert (s.min, s.opt, s.max) == ((2, 4, 5, 7), (2, 4, 33, 65), (6, 4, 125, 125))
    assert prof.limits_for(spec) == {"B": (2, 6), "H": (40, 1000), "W": (56, 1000)}
    up_spec = upscaler_unet_spec(in_channels=8, out_channels=5, vae_scale_factor=8, seq_len=77, cross_attention_dim=32,
                                 time_cond_proj_dim=160)  # H/4: input pixels -> output latents
    up = parse_profile({"name": "up", "dims": {"B": 1, "H": [64, 96, 256], "W": [64, 160, 256]}})
    assert up.shapes_for(up_spec)["sample"].opt == (1, 8, 24, 40)
    bad = parse_profile({"name": "bad", "dims": {"B": 1, "H": [250, 256, 512], "W": 256}})
    with pytest.raises(ProfileError, match=r"H=250 is not a multiple of 8 \(dim H/8\); the nearest that are: 248 "
                                           r"and 256"):
        bad.shapes_for(spec)


def test_build_warns_about_profile_sizes_the_bundle_refuses(lcm_bundle, tmp_path):
    from latentrt.export.tensorrt_build import build_engines
    from latentrt.profiles import parse_profile

    class FakeTensorRT:  # stands in for TensorRT: returns a placeholder plan, never loaded
        version, calls = "10.8.0.43", []

        def compute_capability(self):
            return "9.0"

        def build(self, onnx_path, shapes, options, timing_cache, progress):
            self.calls.append(dict(shapes))
            return b"placeholder"

    bundle = tmp_path / "b"
    shutil.copytree(lcm_bundle, bundle, ignore=shutil.ignore_patterns(".cache"))
    log = []
    prof = parse_profile({"name": "wide", "dims": {"B": 1, "H": [8, 40, 512], "W": [56, 56, 64]},
                          "precision": {"default": "fp32"}})
    api = FakeTensorRT()
    build_engines(bundle, prof, api=api, components=["unet"], progress=log.append)
    warnings = [line for line in log if line.startswith("warning")]
    assert len(warnings) == 1 and "gives H=[8, 40, 512]" in warnings[0]
    assert "16 to 256 px per side in multiples of 8" in warnings[0]
    assert "8: use 16; 512: use 256" in warnings[0]
    assert api.calls[0]["sample"].opt == (1, 4, 5, 7)  # 40x56: latents the UNet does not divide


def test_size_range_nearest():
    r = SizeRange(8, 16, 256)
    assert [r.nearest(v) for v in (4, 16, 44, 48, 255, 900)] == [[16], [16], [40, 48], [48], [248, 256], [256]]
    assert SizeRange(32, 64, 1000).nearest(2000) == [992]  # the largest multiple inside the range
    assert SizeRange(64).nearest(100) == [64, 128] and SizeRange(64).nearest(10) == [64]


def test_generate_cli_takes_any_multiple_of_8_and_refuses_with_the_range(lcm_bundle, tmp_path, capsys):
    from PIL import Image

    from latentrt.cli import main

    out = tmp_path / "out"
    assert main(["generate", str(lcm_bundle), "a cat", "--height", "40", "--width", "56", "--steps", "1", "-o",
                 str(out), "--no-progress"]) == 0
    [png] = out.glob("*.png")
    with Image.open(png) as img:
        assert img.size == (56, 40)
    capsys.readouterr()
    assert main(["generate", str(lcm_bundle), "a cat", "--height", "4096", "--steps", "1", "-o", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "height=4096 px is above the sizes this bundle supports (16 to 256 px" in err and "Traceback" not in err
