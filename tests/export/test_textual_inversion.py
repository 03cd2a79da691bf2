"""Textual inversion at export (issue 17 item 3): tokens and embedding rows added to the bundle give
diffusers' image after ``load_textual_inversion`` (SD: diffusers and A1111 formats, a multi-vector
token; SDXL: a clip_l / clip_g file), and bad files are refused clearly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import latentrt
from latentrt.export.bundle import export_bundle
from latentrt.export.textual_inversion import TextualInversionError
from latentrt.runtime.random import TorchGeneratorNoise

TOL = 1e-4


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def _images(ref, ours, prompt, **kw):
    want = ref(prompt, generator=torch.Generator().manual_seed(4), output_type="np", **kw).images
    got = ours(prompt, generator=TorchGeneratorNoise(4), output_type="np", **kw).images
    return got, want


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ti")
    save_file({"<cat-toy>": _randn(32, seed=1)}, str(d / "learned_embeds.safetensors"))  # diffusers
    save_file({"emb_params": _randn(3, 32, seed=2)}, str(d / "sty.safetensors"))  # A1111, 3 vectors
    torch.save({"string_to_param": {"*": _randn(2, 32, seed=3)}, "name": "<pt-tok>"}, str(d / "a1111.pt"))
    save_file({"<wide>": _randn(64, seed=4)}, str(d / "wide.safetensors"))
    return d


def test_sd_prompts_with_the_tokens_match_diffusers(sd_files, tmp_path):
    from latentrt.export.tiny import tiny_sd_pipeline

    ref = tiny_sd_pipeline(0)
    ref.set_progress_bar_config(disable=True)
    export_bundle(None, tmp_path / "b", pipe=ref, check=False, progress=lambda *_: None,
                  textual_inversions=[str(sd_files / "learned_embeds.safetensors"),
                                      f"{sd_files / 'sty.safetensors'}:<sty>", str(sd_files / "a1111.pt")],
                  allow_pickle=True)
    ours = latentrt.load(tmp_path / "b")
    prompt = "a photo of <cat-toy> in <sty> style"
    plain = _images(ref, ours, prompt, num_inference_steps=2)[1]  # diffusers before loading the embeddings
    ref.load_textual_inversion(str(sd_files / "learned_embeds.safetensors"))  # diffusers reads the file itself
    ref.load_textual_inversion(str(sd_files / "sty.safetensors"), token="<sty>")
    ref.load_textual_inversion(torch.load(str(sd_files / "a1111.pt"), weights_only=False))
    for p, neg in ((prompt, "<sty>"), (["<pt-tok> on a hill", "a dog"], ["<sty>", "blurry"])):
        got, want = _images(ref, ours, p, num_inference_steps=2, negative_prompt=neg)
        assert float(np.abs(got - want).max()) <= TOL
    assert float(np.abs(_images(ref, ours, prompt, num_inference_steps=2)[1] - plain).max()) > 1e-3
    records = ours.bundle.manifest.extra["textual_inversion"]
    assert [(r["token"], r["vectors"]) for r in records] == [("<cat-toy>", 1), ("<sty>", 3), ("<pt-tok>", 2)]


def test_sdxl_two_encoder_file_matches_diffusers(tmp_path):
    from latentrt.export.tiny import tiny_sdxl_pipeline

    ref = tiny_sdxl_pipeline(0)
    ref.set_progress_bar_config(disable=True)
    w1, w2 = ref.text_encoder.config.hidden_size, ref.text_encoder_2.config.hidden_size
    state = {"clip_l": _randn(2, w1, seed=5), "clip_g": _randn(2, w2, seed=6)}
    save_file(state, str(tmp_path / "xl-emb.safetensors"))
    export_bundle(None, tmp_path / "b", pipe=ref, check=False, progress=lambda *_: None,
                  textual_inversions=[f"{tmp_path / 'xl-emb.safetensors'}:<xl>"])
    ours = latentrt.load(tmp_path / "b")
    ref.load_textual_inversion(state["clip_l"], token="<xl>", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="<xl>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    got, want = _images(ref, ours, "a <xl> house", num_inference_steps=2, negative_prompt="blurry")
    assert float(np.abs(got - want).max()) <= TOL


def test_bad_files(sd_files, tmp_path):
    from latentrt.export.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(0)

    def export(*items, **kw):
        export_bundle(None, tmp_path / "b", pipe=pipe, check=False, progress=lambda *_: None, overwrite=True,
                      textual_inversions=list(items), **kw)

    with pytest.raises(TextualInversionError, match=r"768.*1024|32 wide"):
        export(str(sd_files / "wide.safetensors"))
    with pytest.raises(TextualInversionError, match="--allow-pickle"):
        export(str(sd_files / "a1111.pt"))
    with pytest.raises(TextualInversionError, match="no such file"):
        export(str(tmp_path / "missing.safetensors"))
    with pytest.raises(TextualInversionError, match="already in the tokenizer"):
        export(f"{sd_files / 'learned_embeds.safetensors'}:cat")
    # the CLI says it in one line
    from latentrt.export.tiny import save_tiny_sd

    src = save_tiny_sd(tmp_path / "sd")
    r = subprocess.run([sys.executable, "-m", "latentrt.cli", "export", str(src), "-o", str(tmp_path / "c"),
                        "--check", "off", "--textual-inversion", str(sd_files / "a1111.pt")],
                       capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "--allow-pickle" in last
    assert "Traceback" not in r.stderr
