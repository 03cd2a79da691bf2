"""The CLIP vocabulary rebuilt from open_clip_torch's data file matches published SD tokenizers."""

import importlib.metadata
import importlib.util
import json

import pytest

from latentrt.export import vocab as vocab_mod
from latentrt.export.vocab import clip_bpe_path, clip_vocab_and_merges, write_clip_tokenizer

# "a photo of an astronaut riding a horse" as the published SD1.5 tokenizer encodes it.
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_bpe_file_found_without_importing_open_clip():
    import sys

    path = clip_bpe_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.is_file()
    assert "open_clip" not in sys.modules


def test_missing_bpe_file_says_how_to_install(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(vocab_mod.importlib.metadata, "files", no_dist)
    monkeypatch.setattr(vocab_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps open_clip_torch"):
        clip_bpe_path()


def test_vocab_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(set(vocab.values())) == 49408
    assert len(merges) == 49152 - 256 - 2
    assert merges[0] == "i n"
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["astronaut</w>"] == 18376


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_transformers_loads_written_folder(tmp_path, pad_token, pad_id):
    transformers = pytest.importorskip("transformers")
    write_clip_tokenizer(tmp_path, pad_token=pad_token)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\ni n\n")
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == pad_token

    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, pad_id)
    assert tok.model_max_length == 77
    ids = tok("a photo of an astronaut riding a horse", padding="max_length", max_length=77, truncation=True)
    assert ids.input_ids == ASTRONAUT_IDS + [pad_id] * (77 - len(ASTRONAUT_IDS))


def test_bad_pad_token(tmp_path):
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        write_clip_tokenizer(tmp_path, pad_token="<pad>")
