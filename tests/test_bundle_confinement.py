"""Bundle confinement: every path a manifest names resolves inside the bundle, or loading refuses it.

Each crafted bundle records the correct sha256 of the file it points at, so only confinement can
refuse it (a control loads the same kind of bundle when its paths stay inside).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import latentrt
from latentrt.manifest import MANIFEST_NAME, BundleError, read_manifest, sha256_file, verify_files
from latentrt.onnx_refs import OnnxFormatError, external_data_locations


@pytest.fixture
def bundle_copy(lcm_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(lcm_bundle, dst, ignore=shutil.ignore_patterns(".cache"))
    return dst


def _edit(bundle, fn):
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _point_component(bundle, component: str, rel: str, target) -> None:
    """Make the manifest's ``component`` use the file at ``target`` under the name ``rel``, with its sha256."""

    def fn(d):
        c = d["components"][component]
        c["path"] = rel
        c["files"] = {rel: sha256_file(target)}
        c["sizes"] = {rel: os.path.getsize(target)}

    _edit(bundle, fn)


def _outside_copy(bundle, tmp_path, component="text_encoder"):
    other = tmp_path / "other" / component
    other.mkdir(parents=True)
    shutil.copy(bundle / component / "model.onnx", other / "model.onnx")
    return other / "model.onnx"


def test_dotdot_path_is_refused(bundle_copy, tmp_path):
    target = _outside_copy(bundle_copy, tmp_path)
    _point_component(bundle_copy, "text_encoder", "../other/text_encoder/model.onnx", target)
    with pytest.raises(BundleError, match=r"'\.\./other/text_encoder/model\.onnx' is outside the bundle"):
        latentrt.load(bundle_copy)


def test_dotdot_that_stays_inside_is_accepted(bundle_copy):
    _point_component(bundle_copy, "text_encoder", "unet/../text_encoder/model.onnx",
                     bundle_copy / "text_encoder" / "model.onnx")
    pipe = latentrt.load(bundle_copy)
    assert pipe("a cat", num_inference_steps=1, output_type="np", height=64, width=64).images.shape == (1, 64, 64, 3)


def test_absolute_path_is_refused(bundle_copy, tmp_path):
    target = _outside_copy(bundle_copy, tmp_path)
    _point_component(bundle_copy, "text_encoder", str(target), target)
    with pytest.raises(BundleError, match=r"is an absolute path, outside the bundle"):
        latentrt.load(bundle_copy)


def test_absolute_path_into_the_bundle_is_refused_too(bundle_copy):
    target = bundle_copy / "text_encoder" / "model.onnx"
    _point_component(bundle_copy, "text_encoder", str(target.resolve()), target)
    with pytest.raises(BundleError, match=r"absolute path"):
        read_manifest(bundle_copy)


def test_symlinked_model_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    target = _outside_copy(bundle_copy, tmp_path, "unet")
    (bundle_copy / "unet" / "model.onnx").unlink()
    (bundle_copy / "unet" / "model.onnx").symlink_to(target)  # same bytes: the recorded sha256 matches
    recorded = json.loads((bundle_copy / MANIFEST_NAME).read_text())["components"]["unet"]["files"]
    assert sha256_file(bundle_copy / "unet" / "model.onnx") == recorded["unet/model.onnx"]
    with pytest.raises(BundleError, match=r"'unet/model\.onnx' is outside the bundle \(it resolves to .*other"):
        latentrt.load(bundle_copy)


def test_symlinked_folder_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    shutil.move(bundle_copy / "tokenizer", tmp_path / "tokenizer")
    (bundle_copy / "tokenizer").symlink_to(tmp_path / "tokenizer")
    with pytest.raises(BundleError, match=r"tokenizer folder 'tokenizer' is outside the bundle"):
        latentrt.load(bundle_copy)


def test_symlink_inside_the_bundle_is_accepted(bundle_copy):
    shutil.move(bundle_copy / "scheduler", bundle_copy / "scheduler-real")
    (bundle_copy / "scheduler").symlink_to("scheduler-real")
    latentrt.load(bundle_copy)


def test_cache_symlinked_out_of_the_bundle_is_not_used(bundle_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("LATENTRT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "elsewhere").mkdir()
    (bundle_copy / ".cache").symlink_to(tmp_path / "elsewhere")
    pipe = latentrt.load(bundle_copy)
    assert pipe.bundle.cache_dir.is_relative_to(tmp_path / "home")
    assert not any((tmp_path / "elsewhere").iterdir())  # nothing written through the link


def _externalize(bundle, component: str, location: str, data_dir) -> None:
    """Rewrite ``component``'s model with its weights in one external file at ``location`` (relative to
    the model's folder; the file itself is written to ``data_dir``), and record the model's sha256."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    path = bundle / component / "model.onnx"
    model = onnx.load(str(path))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    onnx.save_model(model, str(data_dir / "staging.onnx"))  # writes data_dir/weights.bin
    model = onnx.load(str(data_dir / "staging.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, str(path))
    (data_dir / "staging.onnx").unlink()

    def fn(d):
        c = d["components"][component]
        c["files"] = {c["path"]: sha256_file(path)}
        c["sizes"] = {c["path"]: path.stat().st_size}

    _edit(bundle, fn)


def test_external_data_outside_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _externalize(bundle_copy, "unet", "../../elsewhere/weights.bin", outside)
    assert external_data_locations(bundle_copy / "unet" / "model.onnx") == ["../../elsewhere/weights.bin"]
    with pytest.raises(BundleError, match=r"external data '\.\./\.\./elsewhere/weights\.bin' of unet/model\.onnx.*"
                                          r"is outside the bundle"):
        latentrt.load(bundle_copy)
    with pytest.raises(BundleError, match="outside the bundle"):  # also when verification is skipped
        latentrt.load(bundle_copy, verify=False)


def test_external_data_is_checked_again_when_the_model_changes_after_verification(bundle_copy, tmp_path):
    """Bundle.verify's external-data check is reused by Bundle.engine only while the model file is the one it
    read (size, mtime, inode): a model replaced in between, with a reference out of the bundle, is refused."""
    from latentrt.runtime.bundle import Bundle

    bundle = Bundle(bundle_copy)  # verified: the UNet has no external data
    assert bundle.external_data("unet") == []
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _externalize(bundle_copy, "unet", "../../elsewhere/weights.bin", outside)  # a new file (new inode)
    with pytest.raises(BundleError, match="outside the bundle"):
        bundle.engine("unet")


def test_external_data_absolute_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _externalize(bundle_copy, "unet", str(outside / "weights.bin"), outside)
    with pytest.raises(BundleError, match=r"external data .* is an absolute path"):
        latentrt.load(bundle_copy, verify=False)


def test_external_data_inside_but_unrecorded_is_refused(bundle_copy):
    _externalize(bundle_copy, "unet", "weights.bin", bundle_copy / "unet")
    with pytest.raises(BundleError, match=r"keeps weights in 'weights\.bin', which is not one of component 'unet'"):
        latentrt.load(bundle_copy)


def test_external_data_inside_and_recorded_loads_and_runs(bundle_copy, lcm_bundle):
    _externalize(bundle_copy, "unet", "weights.bin", bundle_copy / "unet")

    def fn(d):
        c = d["components"]["unet"]
        data = bundle_copy / "unet" / "weights.bin"
        c["files"]["unet/weights.bin"] = sha256_file(data)
        c["sizes"]["unet/weights.bin"] = data.stat().st_size

    _edit(bundle_copy, fn)
    kw = dict(num_inference_steps=1, output_type="np", height=64, width=64, generator=0)
    got = latentrt.load(bundle_copy)("a cat", **kw).images
    ref = latentrt.load(lcm_bundle)("a cat", **kw).images
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_external_data_reader_matches_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "W")
    b = numpy_helper.from_array(np.ones((8,), np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])], [w, b])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    expected = [e.value for t in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer
                for e in t.external_data if e.key == "location"]
    assert external_data_locations(tmp_path / "m.onnx") == expected == ["W", "b"]
    (tmp_path / "bad.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:-7])
    with pytest.raises(OnnxFormatError):
        external_data_locations(tmp_path / "bad.onnx")


def test_plan_file_outside_engines_is_refused(bundle_copy):
    plan = bundle_copy / "unet" / "unet.plan"
    plan.write_bytes(b"not really a plan")

    def fn(d):
        d.setdefault("extra", {})["engines"] = {"k" * 20: {
            "component": "unet", "profile": "p", "path": "unet/unet.plan", "plan_sha256": sha256_file(plan),
            "plan_size": plan.stat().st_size, "onnx_sha256": d["components"]["unet"]["files"]["unet/model.onnx"],
            "tensorrt": "10.0", "compute_capability": "8.9"}}

    _edit(bundle_copy, fn)
    with pytest.raises(BundleError, match=r"TensorRT plan of engine 'k+' 'unet/unet\.plan' is outside the "
                                          r"bundle's engines/ folder"):
        latentrt.load(bundle_copy)


def test_plan_record_outside_engines_is_never_selected(lcm_bundle):
    from latentrt.engine_cache import engine_problems

    problems = engine_problems({"path": "../x.plan", "onnx_sha256": "a"}, onnx_sha="a", trt_version=None,
                               compute_capability=None, bundle=lcm_bundle)
    assert problems and "outside the bundle's engines/ folder" in problems[0]


def test_component_name_that_is_a_path_is_refused(bundle_copy):
    _edit(bundle_copy, lambda d: d["components"].__setitem__("../unet", d["components"].pop("unet")))
    with pytest.raises(BundleError, match=r"component name '\.\./unet' is not a plain name"):
        latentrt.load(bundle_copy)


def test_cached_optimized_model_with_external_data_out_of_the_cache_is_refused(bundle_copy, tmp_path):
    import onnx

    latentrt.load(bundle_copy)  # writes the optimized-model cache
    cache = bundle_copy / ".cache"
    cached = next(cache.glob("unet-*.ort.onnx"))
    model = onnx.load(str(cached), load_external_data=False)
    onnx.load_external_data_for_model(model, str(cache))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    onnx.save_model(model, str(outside / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    model = onnx.load(str(outside / "m.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../elsewhere/w.bin"
    onnx.save_model(model, str(cached))
    with pytest.raises(BundleError, match=r"external data '\.\./\.\./elsewhere/w\.bin' of the cached optimized "
                                          r"model .* is outside"):
        latentrt.load(bundle_copy)


def _info_verify(bundle):
    return subprocess.run([sys.executable, "-m", "latentrt.cli", "info", str(bundle), "--verify"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def test_info_verify_reports_paths_outside(bundle_copy, tmp_path):
    ok = _info_verify(bundle_copy)
    assert ok.returncode == 0, ok.stderr
    assert "lies inside the bundle" in ok.stdout
    target = _outside_copy(bundle_copy, tmp_path)
    _point_component(bundle_copy, "text_encoder", "../other/text_encoder/model.onnx", target)
    r = _info_verify(bundle_copy)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is outside the bundle" in r.stderr


def test_info_verify_reports_a_stray_symlink_out(bundle_copy, tmp_path):
    (tmp_path / "secret").write_text("x")
    (bundle_copy / "unet" / "notes.txt").symlink_to(tmp_path / "secret")  # named by no manifest entry
    latentrt.load(bundle_copy)  # loading never reads it
    r = _info_verify(bundle_copy)
    assert r.returncode == 2 and "symlink 'unet/notes.txt' is outside the bundle" in r.stderr, r.stderr


def test_verify_files_refuses_unlisted_escape(bundle_copy, tmp_path):
    target = _outside_copy(bundle_copy, tmp_path)
    m = read_manifest(bundle_copy)
    m.components["text_encoder"].files["../other/text_encoder/model.onnx"] = sha256_file(target)
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_files(bundle_copy, m)
