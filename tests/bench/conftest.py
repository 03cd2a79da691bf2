"""Fixtures of the benchmark / TAESD tests: a tiny TAESD and a tiny LCM bundle that carries it."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture(scope="session")
def taesd_dir(tiny_lcm_dir):
    from latentrt.export.tiny import save_tiny_taesd

    return save_tiny_taesd(tiny_lcm_dir.parent / "tiny-taesd")


@pytest.fixture(scope="session")
def taesd_bundle(tiny_lcm_dir, taesd_dir, tmp_path_factory):
    from latentrt.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "lcm-taesd"
    export_bundle(tiny_lcm_dir, out, tiny_vae=str(taesd_dir), check=False, progress=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def no_taesd_bundle(taesd_bundle, tmp_path_factory):
    """The same bundle without its TAESD components (a copy with a trimmed manifest)."""
    out = tmp_path_factory.mktemp("bundles") / "lcm-no-taesd"
    shutil.copytree(taesd_bundle, out, ignore=shutil.ignore_patterns(".cache", "tiny_vae_*"))
    m = json.loads((out / "latentrt.json").read_text())
    for c in ("tiny_vae_decoder", "tiny_vae_encoder"):
        m["components"].pop(c)
    (out / "latentrt.json").write_text(json.dumps(m))
    return out


# -- the seed pipelines' tiny bundles (tests/bench/test_bench_upscale.py, test_bench_unclip.py, test_bench_tasks.py)
def _export_tiny(root, save):
    from latentrt.export.bundle import export_bundle

    folder = save(root / "model")
    export_bundle(folder, root / "bundle", check=False, progress=lambda *_: None)
    return root / "bundle"


@pytest.fixture(scope="session")
def upscaler_bench_bundle(tmp_path_factory):
    """The tiny x2 latent upscaler, exported from its saved diffusers folder (the baseline's weights)."""
    from latentrt.export.tiny import save_tiny_upscaler

    return _export_tiny(tmp_path_factory.mktemp("bench-upscaler"), save_tiny_upscaler)


@pytest.fixture(scope="session")
def unclip_bench_bundles(tmp_path_factory):
    """{"unclip": text-to-image bundle, "unclip-variation": image-variation bundle}, tiny, from saved folders."""
    from latentrt.export.tiny_unclip import save_tiny_unclip

    return {"unclip": _export_tiny(tmp_path_factory.mktemp("bench-unclip"), save_tiny_unclip),
            "unclip-variation": _export_tiny(tmp_path_factory.mktemp("bench-unclip-img2img"),
                                             lambda out: save_tiny_unclip(out, img2img=True))}
