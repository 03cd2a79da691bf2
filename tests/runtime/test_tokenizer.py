"""The runtime CLIP tokenizer gives the same ids as transformers' CLIPTokenizer."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latentrt.runtime.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
from latentrt.export.vocab import write_clip_tokenizer  # noqa: E402

LONG = " ".join(
    f"a highly detailed oil painting of castle number {i}, trending on artstation, 8k, octane render!"
    for i in range(12)
)
PROMPTS = [
    "",
    " ",
    "a photo of an astronaut riding a horse on mars",
    "Hello, World! How's it going? I'm fine; you're great... (really) [yes] {no} <maybe>",
    "it's don't we've they'll she'd I'M IT'S",
    "numbers 0 12 345 6789 3.14159 1,000,000 $100 50% 2nd 1e-5",
    "MiXeD CaSe PrOmPt, ALL CAPS, lowercase",
    "  extra   spaces\t\ttabs\nnew\n\nlines\r\n  trailing   ",
    "café naïve résumé e\u0301 straße ẞ İstanbul ﬁne Ωmega",
    "emoji 🐱🚀👩‍🚀 🇫🇷 ✨✨✨",
    "東京の夜景、桜 写真 漢字 한국어 ภาษาไทย العربية",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39; <b>bold</b> &nbsp;",
    "no\u00a0break\u200bzero\u3000ideographic ＡＢＣ１２３",
    "special <|startoftext|> tokens <|endoftext|> inside <|ENDOFTEXT|> text",
    "wow!!! hello! !start ! end!",
    "masterpiece, best quality, (ultra-detailed:1.2), ((sharp focus)), [[blurry]]",
    "a_snake_case-name/with\\slashes|pipes~tilde`backtick^caret",
    LONG,
    LONG + " and one more",
]
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """For SD1 and SD2 pads: a published-style folder (vocab.json + merges.txt) and the folder
    that transformers 5 save_pretrained writes from it (tokenizer.json only)."""
    root = tmp_path_factory.mktemp("clip_tokenizers")
    out = {}
    for name, pad in PAD_TOKENS.items():
        write_clip_tokenizer(root / f"{name}_vocab", pad_token=pad)
        ref = transformers.CLIPTokenizer.from_pretrained(root / f"{name}_vocab")
        ref.save_pretrained(root / f"{name}_json")
        assert (root / f"{name}_json" / "tokenizer.json").is_file()
        assert not (root / f"{name}_json" / "vocab.json").exists()
        out[f"{name}_vocab"] = ref
        out[f"{name}_json"] = transformers.CLIPTokenizer.from_pretrained(root / f"{name}_json")
    return root, out


FOLDERS = ["sd1_vocab", "sd1_json", "sd2_vocab", "sd2_json"]


@pytest.fixture(params=FOLDERS)
def pair(request, folders):
    root, refs = folders
    return CLIPTokenizer.from_dir(root / request.param), refs[request.param]


def test_special_ids(pair):
    ours, ref = pair
    assert ours.model_max_length == ref.model_max_length == 77
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )


def _ref_ids(ref, texts, **kw):
    return np.asarray(ref(texts, **kw).input_ids, dtype=np.int64)


def test_same_ids_as_transformers(pair):
    ours, ref = pair
    for prompt in PROMPTS:
        got = ours(prompt)
        assert got.dtype == np.int64 and got.shape == (1, 77)
        want = _ref_ids(ref, [prompt], padding="max_length", max_length=77, truncation=True)
        np.testing.assert_array_equal(got, want, err_msg=repr(prompt))
    # a whole batch at once, and a shorter max_length
    np.testing.assert_array_equal(
        ours(PROMPTS), _ref_ids(ref, PROMPTS, padding="max_length", max_length=77, truncation=True)
    )
    np.testing.assert_array_equal(
        ours(PROMPTS, max_length=16),
        _ref_ids(ref, PROMPTS, padding="max_length", max_length=16, truncation=True),
    )


def test_longest_untruncated_and_decode(pair):
    """What diffusers does to warn about truncated prompts."""
    ours, ref = pair
    batch = PROMPTS[2:5] + [LONG]
    want = _ref_ids(ref, batch, padding="longest")
    np.testing.assert_array_equal(ours(batch, padding="longest", truncation=False), want)
    assert ours.untruncated_length(batch) == [len(ids) for ids in ref(batch).input_ids]
    assert ours.untruncated_length(LONG)[0] > 77
    removed = want[-1, ref.model_max_length - 1 : -1]
    assert ours.decode(removed) == ref.decode(removed.tolist())
    for prompt in PROMPTS:
        ids = ref(prompt).input_ids
        assert ours.decode(ids) == ref.decode(ids), repr(prompt)


def test_truncation_keeps_eos(folders):
    tok = CLIPTokenizer.from_dir(folders[0] / "sd1_vocab")
    ids = tok([LONG, "a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    assert (ids[1, 4:] == tok.pad_token_id).all()


def test_bad_arguments(folders):
    tok = CLIPTokenizer.from_dir(folders[0] / "sd2_vocab")
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="do_not_pad")
    with pytest.raises(ValueError, match="max_length"):
        tok("a", max_length=1)


def test_empty_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.json.*merges\.txt") as err:
        CLIPTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_dir(tmp_path / "missing")


def test_runtime_tokenizer_imports_no_torch():
    code = (
        "import sys, latentrt.runtime.tokenizer\n"
        "bad = {'torch', 'transformers', 'diffusers'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
