"""Profiles: packaged files parse, validation messages, shapes derived from component specs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from latentrt import components as C
from latentrt.profiles import (DimRange, ProfileError, available_profiles, export_precision, load_profile,
                               parse_profile)

SD15_UNET = C.unet_spec(in_channels=4, out_channels=4, vae_scale_factor=8, seq_len=77, cross_attention_dim=768,
                        time_cond_proj_dim=256)
SD15_DECODER = C.vae_decoder_spec(out_channels=3, latent_channels=4, vae_scale_factor=8)


def _doc(**over):
    doc = {"name": "t", "dims": {"B": [1, 1, 4], "H": [256, 512, 1024], "W": [256, 512, 1024]}}
    doc.update(over)
    return doc


def test_packaged_profiles_all_parse():
    names = set(available_profiles())
    assert {"sd15-lcm-512", "sd15-lcm-dynamic", "x2-upscaler", "unclip", "sdxl-1024"} <= names
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.dims["H"].min > 0


def test_static_profile_shapes():
    p = load_profile("sd15-lcm-512")
    shapes = p.shapes_for(SD15_UNET)
    assert shapes["sample"].min == shapes["sample"].max == (1, 4, 64, 64)
    assert shapes["encoder_hidden_states"].opt == (1, 77, 768)
    assert shapes["timestep"].opt == (1,)
    assert p.precision_for("unet") == "fp16"


def test_dynamic_profile_shapes_and_limits():
    p = load_profile("sd15-lcm-dynamic")
    s = p.shapes_for(SD15_UNET)["sample"]
    assert (s.min, s.opt, s.max) == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))
    dec = p.shapes_for(SD15_DECODER)["latent_sample"]
    assert dec.max == (4, 4, 128, 128)
    assert p.limits_for(SD15_UNET) == {"B": (1, 4), "H": (256, 1024), "W": (256, 1024)}


def test_cfg_batch_multiplier_doubles_only_the_unet():
    p = load_profile("sdxl-1024")
    assert p.shapes_for(SD15_UNET)["sample"].opt == (2, 4, 128, 128)
    assert p.shapes_for(SD15_DECODER)["latent_sample"].opt == (1, 4, 128, 128)
    assert p.precision_for("vae_decoder") == "fp32" and p.precision_for("unet") == "fp16"


def test_named_dim_with_two_ranges_is_an_error():
    with pytest.raises(ProfileError, match=r"dim H has two ranges: \[256, 512, 1024\] \(from dims.H\) and 512 \(from dims.H/8\)"):
        parse_profile(_doc(dims={"B": 1, "H": [256, 512, 1024], "H/8": 64, "W": 512}))


def test_explicit_input_shapes_that_disagree_with_dims_are_an_error():
    doc = _doc(shapes={"unet": {"sample": {"min": [1, 4, 64, 64], "opt": [1, 4, 64, 64], "max": [4, 4, 64, 64]}}})
    p = parse_profile(doc)
    with pytest.raises(ProfileError, match="dim H has two ranges.*shapes.unet.sample"):
        p.shapes_for(SD15_UNET)


def test_explicit_input_shapes_that_agree_are_accepted():
    doc = _doc(dims={"B": [1, 1, 4]},
               shapes={"unet": {"sample": {"min": [1, 4, 32, 32], "opt": [1, 4, 64, 64], "max": [4, 4, 96, 96]}}})
    shapes = parse_profile(doc).shapes_for(SD15_UNET)
    assert shapes["sample"].max == (4, 4, 96, 96)


@pytest.mark.parametrize("dims, message", [
    ({"B": [1, 4, 2], "H": 512, "W": 512}, "min <= opt <= max"),
    ({"B": [0, 1, 1], "H": 512, "W": 512}, "0 < min"),
    ({"B": "one", "H": 512, "W": 512}, "integer or \\[min, opt, max\\]"),
    ({"B": 1, "H": 512, "W": 512, "H/7x": 3}, "bad symbolic dim"),
    ({}, "\\[dims\\] is empty"),
])
def test_bad_dims(dims, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(_doc(dims=dims))


@pytest.mark.parametrize("over, message", [
    ({"precision": {"unet": "int8"}}, "precision.unet must be one of"),
    ({"builder": {"optimization_level": 9}}, "optimization_level must be an integer in 0..5"),
    ({"builder": {"fp16": True}}, "unknown builder option"),
    ({"batch_multiplier": {"unet": 0}}, "batch_multiplier.unet must be a positive integer"),
    ({"dimz": {}}, "unknown key"),
])
def test_bad_fields(over, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(_doc(**over))


def test_missing_dim_and_non_divisible_size_are_reported():
    p = parse_profile(_doc(dims={"B": 1, "H": 512}))
    with pytest.raises(ProfileError, match="no range for dim\\(s\\) W used by unet.sample"):
        p.shapes_for(SD15_UNET)
    p = parse_profile(_doc(dims={"B": 1, "H": 500, "W": 512}))
    with pytest.raises(ProfileError, match="not a multiple of 8"):
        p.shapes_for(SD15_UNET)


def test_unknown_profile_and_user_file(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'nope'; packaged profiles: .*sd15-lcm-512"):
        load_profile("nope")
    f = tmp_path / "mine.toml"
    f.write_text('dims = { B = 2, H = 768, W = 512 }\n[precision]\ndefault = "fp16"\nvae_decoder = "fp32"\n')
    p = load_profile(f)
    assert p.name == "mine" and p.dims["B"] == DimRange(2, 2, 2)
    assert export_precision(str(f)) == ("fp16", {"vae_decoder": "fp32"})
    assert export_precision(str(f), None, {"unet": "fp32"}) == ("fp16", {"vae_decoder": "fp32", "unet": "fp32"})
    assert export_precision(str(f), "fp32") == ("fp32", {})
    assert export_precision(None) == ("fp32", {})


def test_profiles_command_lists_and_shows():
    out = subprocess.run([sys.executable, "-m", "latentrt.cli", "profiles"], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)
    assert "sd15-lcm-dynamic" in out.stdout and "sdxl-1024" in out.stdout
    out = subprocess.run([sys.executable, "-m", "latentrt.cli", "profiles", "x2-upscaler"], capture_output=True,
                         text=True, encoding="utf-8", errors="replace", check=True)
    assert "unet=2" in out.stdout and "vae_decoder=fp32" in out.stdout


def test_profiles_command_shows_shapes_for_a_bundle(lcm_bundle, tmp_path, capsys):
    from latentrt.cli import main

    prof = tmp_path / "tiny.toml"
    prof.write_text('pipeline = "lcm"\n[dims]\nB = [1, 1, 2]\nH = [32, 64, 128]\nW = 64\n')
    assert main(["profiles", str(prof), "--bundle", str(lcm_bundle)]) == 0
    out = capsys.readouterr().out
    assert "sample                   min [1, 4, 4, 8]  opt [1, 4, 8, 8]  max [2, 4, 16, 8]" in out
    assert "input_ids                min [1, 77]  opt [1, 77]  max [2, 77]" in out
