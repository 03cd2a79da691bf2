"""Bad input: a checker asked of a bundle without one, a bad ``safety_checker`` value, malformed or
out-of-bundle concept data (the bundle is untrusted), export requests that cannot be met."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import types

import numpy as np
import pytest

import latentrt
from latentrt.export.recipes import UnsupportedModelError
from latentrt.export.safety import prepare_safety_checker
from latentrt.manifest import BundleError
from latentrt.runtime.bundle import Bundle
from latentrt.runtime.safety import SafetyChecker, SafetyCheckerError

ARGS = dict(num_inference_steps=1, generator=0, output_type="np")


def test_true_on_a_bundle_without_one(lcm_bundle):
    pipe = latentrt.load(lcm_bundle)
    with pytest.raises(SafetyCheckerError, match="has no safety checker.*--safety-checker"):
        pipe("a cat", safety_checker=True, **ARGS)
    assert "unet" not in pipe.timer.as_dict()  # refused before any engine ran
    assert pipe("a cat", safety_checker=False, **ARGS).nsfw_content_detected is None


def test_not_a_bool(lcm_bundle):
    with pytest.raises(SafetyCheckerError, match="safety_checker must be True, False or None"):
        latentrt.load(lcm_bundle)("a cat", safety_checker="yes", **ARGS)


def _copy(case, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(case.bundle, dest, ignore=shutil.ignore_patterns(".cache"))
    return dest


def _rewrite(bundle, data: bytes, path="safety_checker/concepts.npz"):
    """Replace the concept file and record its hash (a bundle whose manifest agrees with a bad file)."""
    (bundle / "safety_checker" / "concepts.npz").write_bytes(data)
    m = json.loads((bundle / "latentrt.json").read_text())
    m["extra"]["safety_checker"]["concepts"].update(path=path, sha256=hashlib.sha256(data).hexdigest())
    (bundle / "latentrt.json").write_text(json.dumps(m))


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good():
    return {"concept_embeds": np.ones((17, 16), np.float32), "concept_embeds_weights": np.ones(17, np.float32),
            "special_care_embeds": np.ones((3, 16), np.float32), "special_care_embeds_weights": np.ones(3, np.float32)}


@pytest.mark.parametrize("make, words", [
    (lambda b: (b / "safety_checker" / "concepts.npz").write_bytes(b"garbage"), "does not match the sha256"),
    (lambda b: _rewrite(b, b"not a zip"), "does not load as a numpy .npz"),
    (lambda b: _rewrite(b, _npz(**{**_good(), "concept_embeds": np.array([{"x": 1}], dtype=object)})),
     "does not load as a numpy .npz without pickle"),
    (lambda b: _rewrite(b, _npz(**{k: v for k, v in _good().items() if k != "special_care_embeds"})),
     "expected exactly"),
    (lambda b: _rewrite(b, _npz(**{**_good(), "concept_embeds": np.ones((17, 8), np.float32)})), "8 wide"),
    (lambda b: _rewrite(b, _npz(**{**_good(), "concept_embeds_weights": np.ones(5, np.float32)})),
     "one threshold per row"),
    (lambda b: _rewrite(b, _npz(**{**_good(), "special_care_embeds": np.full((3, 16), np.nan, np.float32)})),
     "NaN or infinite"),
    (lambda b: _rewrite(b, _npz(**{**_good(), "concept_embeds": np.ones((17, 16), np.int64)})), "expected floats"),
    (lambda b: _rewrite(b, _npz(**_good()), path="../outside.npz"), "outside the bundle"),
    (lambda b: (b / "safety_checker" / "concepts.npz").unlink(), "is missing"),
])
def test_malformed_concept_data(make, words, safe_cases, tmp_path):
    bundle = _copy(safe_cases("lcm"), tmp_path)
    make(bundle)
    with pytest.raises(BundleError, match=words):
        SafetyChecker(Bundle(bundle))


def test_a_call_refuses_bad_concept_data_before_any_engine_runs(safe_cases, tmp_path):
    bundle = _copy(safe_cases("lcm"), tmp_path)
    (bundle / "safety_checker" / "concepts.npz").write_bytes(b"garbage")
    pipe = latentrt.load(bundle)
    with pytest.raises(BundleError, match="safety checker's concept data .* does not match the sha256"):
        pipe("a cat", **ARGS)
    assert "unet" not in pipe.timer.as_dict()
    assert pipe("a cat", safety_checker=False, **ARGS).nsfw_content_detected is None  # off: no need of it


def test_valid_replacement_concepts_load(safe_cases, tmp_path):
    bundle = _copy(safe_cases("lcm"), tmp_path)
    _rewrite(bundle, _npz(**_good()))
    assert SafetyChecker(Bundle(bundle)).concepts.concept_embeds.shape == (17, 16)


def test_export_refusals(tiny_lcm_dir, tmp_path):
    from latentrt.export.bundle import export_bundle

    with pytest.raises(UnsupportedModelError, match="carries none"):
        export_bundle(tiny_lcm_dir, tmp_path / "x", safety_checker=True, check="off", progress=lambda *_: None)
    assert not (tmp_path / "x").exists()
    no_checker = types.SimpleNamespace(safety_checker=None, feature_extractor=None)
    with pytest.raises(UnsupportedModelError, match="SDXL pipelines have no safety checker"):
        prepare_safety_checker(no_checker, None, "sdxl", True)
    assert prepare_safety_checker(no_checker, None, "sdxl", None) is None
    with pytest.raises(ValueError, match="safety_checker must be True, False or None"):
        prepare_safety_checker(no_checker, None, "lcm", "on")


def test_default_follows_the_source(safe_cases, tmp_path):
    """Default: exported when the source carries one; an index naming one whose folder is missing: a note."""
    case = safe_cases("lcm")
    notes = []
    got = prepare_safety_checker(types.SimpleNamespace(safety_checker=None, feature_extractor=None), case.folder,
                                 "lcm", None, progress=notes.append)
    assert got is not None and got.plan.spec.name == "safety_checker"
    assert prepare_safety_checker(types.SimpleNamespace(), case.folder, "lcm", False) is None
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(case.folder / "model_index.json", half / "model_index.json")
    notes.clear()
    assert prepare_safety_checker(types.SimpleNamespace(safety_checker=None), half, "lcm", None,
                                  progress=notes.append) is None
    assert any("safety_checker/ folder is missing" in n for n in notes)


def test_cli_flags():
    import argparse

    from latentrt.commands import export, serve

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    export.register(sub)
    serve.register(sub)
    assert parser.parse_args(["export", "src", "-o", "out"]).safety_checker is None
    assert parser.parse_args(["export", "src", "-o", "out", "--safety-checker"]).safety_checker is True
    assert parser.parse_args(["export", "src", "-o", "out", "--no-safety-checker"]).safety_checker is False
    assert parser.parse_args(["serve", "b", "--safety-checker", "off"]).safety_checker == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "b", "--safety-checker", "maybe"])


def test_sdxl_says_it_has_none():
    """diffusers' SDXL pipelines have no safety checker: an SDXL bundle carries none and says so."""
    from latentrt.runtime.safety import check_request

    pipe = types.SimpleNamespace(bundle=types.SimpleNamespace(
        has=lambda c: False, path="sdxl-bundle", manifest=types.SimpleNamespace(pipeline="sdxl")))
    with pytest.raises(SafetyCheckerError, match="SDXL pipelines have no safety checker"):
        check_request(pipe, True)
    check_request(pipe, None)
    check_request(pipe, False)


def test_generate_cli_marks_flagged_images(safe_cases, tmp_path, capsys):
    from latentrt.cli import main

    bundle = str(safe_cases("lcm").bundle)
    _rewrite_all_flagged = _npz(**{**_good(), "concept_embeds_weights": np.full(17, -2.0, np.float32)})
    flagged = tmp_path / "flagged"
    shutil.copytree(bundle, flagged, ignore=shutil.ignore_patterns(".cache"))
    _rewrite(flagged, _rewrite_all_flagged)  # every similarity beats a threshold of -2: every image flagged
    assert main(["generate", str(flagged), "a cat", "--steps", "1", "--no-progress", "-o", str(tmp_path / "a")]) == 0
    assert "the safety checker flagged it" in capsys.readouterr().out
    assert main(["generate", str(flagged), "a cat", "--steps", "1", "--no-progress", "--no-safety-checker", "-o",
                 str(tmp_path / "b")]) == 0
    assert "flagged" not in capsys.readouterr().out
    from PIL import Image

    (a,), (b,) = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert not np.asarray(Image.open(a)).any() and np.asarray(Image.open(b)).std() > 1
