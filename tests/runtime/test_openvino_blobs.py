"""Compiled OpenVINO models imported straight from their recorded blob (openvino_blobs): a second
engine imports what the first compiled, gives the same outputs, and anything off about the record or
the blob (size, header, a name outside the folder, bytes OpenVINO cannot import) makes it compile
through OpenVINO's cache instead, never fail or read outside the folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")

from latentrt.runtime.bundle import Bundle  # noqa: E402
from latentrt.runtime.engines.openvino_blobs import RECORD  # noqa: E402


@pytest.fixture()
def bundle(lcm_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTRT_CACHE", str(tmp_path / "cache"))  # a cache of this test's own
    return Bundle(lcm_bundle)


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)


def _decoder(bundle, shapes="static"):
    return bundle.engine("vae_decoder", "openvino", precision="fp32", shapes=shapes)


def _first(bundle, shapes="static"):
    """A first engine compiles and records; returns (its output, the key folder, the record)."""
    dec = _decoder(bundle, shapes)
    out = dec(latent_sample=_latents())["sample"]
    how = dec.compilations[-1]
    assert how["source"] == "compiled"
    folder = Path(how["cache_dir"])
    return out, folder, json.loads((folder / RECORD).read_text())


@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_a_new_engine_imports_the_recorded_blob(bundle, shapes):
    out, folder, rec = _first(bundle, shapes)
    blob = folder / rec["blob"]
    assert blob.is_file() and rec["size"] == blob.stat().st_size
    assert rec["precision"] == "fp32" and rec["ov"] == ov.__version__
    assert rec["shapes"] == ([["latent_sample", [1, 4, 8, 8]]] if shapes == "static" else None)
    dec = _decoder(bundle, shapes)
    again = dec(latent_sample=_latents())["sample"]
    assert [c["source"] for c in dec.compilations] == ["imported"]
    assert np.array_equal(out, again)
    # the mapping the compiled model reads from stays alive with it: more calls, other inputs
    for seed in (1, 2):
        assert np.array_equal(dec(latent_sample=_latents(seed))["sample"],
                              _decoder(bundle, shapes)(latent_sample=_latents(seed))["sample"])


def _spoil(kind, folder, rec, tmp_path):
    if kind == "size":
        rec["size"] += 1
    elif kind == "outside":  # a record naming a file outside its folder is not followed
        outside = tmp_path / "elsewhere.blob"
        outside.write_bytes((folder / rec["blob"]).read_bytes())
        rec["blob"] = "../../../../elsewhere.blob"
    elif kind == "version":  # a blob of another OpenVINO version
        blob = folder / rec["blob"]
        data = blob.read_bytes().replace(f'ie_version="{ov.__version__}"'.encode(), b'ie_version="0.0.0"', 1)
        blob.chmod(0o600)
        blob.write_bytes(data)
        rec["size"] = len(data)
    elif kind == "garbage":  # a header as expected, then bytes OpenVINO cannot import
        blob = folder / rec["blob"]
        head = blob.read_bytes()[:4096]
        data = head[:head.index(b"/>\n") + 3] + b"\0" * 1000
        blob.chmod(0o600)
        blob.write_bytes(data)
        rec["size"] = len(data)
    elif kind == "not-json":
        (folder / RECORD).write_text("{")
        return
    (folder / RECORD).write_text(json.dumps(rec))


@pytest.mark.parametrize("kind", ["size", "outside", "version", "garbage", "not-json"])
def test_a_record_or_blob_that_is_off_is_compiled_again(bundle, tmp_path, kind):
    out, folder, rec = _first(bundle)
    _spoil(kind, folder, rec, tmp_path)
    dec = _decoder(bundle)
    assert np.array_equal(dec(latent_sample=_latents())["sample"], out)
    assert [c["source"] for c in dec.compilations] == ["compiled"]
    if kind == "version":  # OpenVINO's own lookup takes that blob (it checks another field) and keeps it
        return
    # the compile recorded the blob again, and the next engine imports it
    rec2 = json.loads((folder / RECORD).read_text())
    assert rec2["size"] == (folder / rec2["blob"]).stat().st_size and "/" not in rec2["blob"]
    dec2 = _decoder(bundle)
    assert np.array_equal(dec2(latent_sample=_latents())["sample"], out)
    assert [c["source"] for c in dec2.compilations] == ["imported"]


def test_a_record_for_another_precision_is_not_imported(bundle):
    _, folder, rec = _first(bundle)
    rec["precision"] = "bf16"
    (folder / RECORD).write_text(json.dumps(rec))
    dec = _decoder(bundle)
    dec(latent_sample=_latents())
    assert [c["source"] for c in dec.compilations] == ["compiled"]


def test_the_mapping_lives_as_long_as_the_compiled_model(bundle):
    """OpenVINO reads the imported model's weights from the mapped blob: evicting an imported shape,
    dropping the engine or keeping only its compiled model must never leave it reading unmapped memory
    (that crashed the process before the mapping was tied to the compiled model)."""
    import gc

    small = np.random.default_rng(5).standard_normal((1, 4, 8, 12)).astype(np.float32)
    first = _decoder(bundle)
    want = {8: first(latent_sample=_latents())["sample"], 12: first(latent_sample=small)["sample"]}
    dec = bundle.engine("vae_decoder", "openvino", precision="fp32", shapes="static", max_shapes=1)
    for _ in range(2):  # each call evicts the other shape's imported model
        assert np.array_equal(dec(latent_sample=_latents())["sample"], want[8])
        assert np.array_equal(dec(latent_sample=small)["sample"], want[12])
        gc.collect()
    assert {c["source"] for c in dec.compilations} == {"imported"} and len(dec._compiled) == 1
    compiled = dec.compiled
    del dec
    gc.collect()
    request = compiled.create_infer_request()
    request.infer({0: small})
    assert np.array_equal(request.get_output_tensor(0).data, want[12])
