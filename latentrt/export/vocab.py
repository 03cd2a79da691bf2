"""The real CLIP BPE vocabulary, written as a tokenizer folder (stdlib only).

Stable Diffusion's text encoders use OpenAI CLIP's byte-level BPE. Its merges ship inside the
``open_clip_torch`` distribution (``bpe_simple_vocab_16e6.txt.gz``); from them we rebuild the same
``vocab.json`` (49408 entries) and ``merges.txt`` that published SD checkpoints carry, so tiny test
pipelines tokenize exactly like real ones without downloading anything.

``open_clip`` itself is never imported (it needs torchvision): only its data file is located.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

__all__ = ["clip_bpe_path", "clip_vocab_and_merges", "write_clip_tokenizer"]

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408


def clip_bpe_path() -> Path:
    """Path of CLIP's ``bpe_simple_vocab_16e6.txt.gz`` in the installed open_clip_torch."""
    candidates: list[Path] = []
    try:
        for f in importlib.metadata.files("open_clip_torch") or ():
            if f.name == _BPE_FILE:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec("open_clip")  # finds the package without running it
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(d) / _BPE_FILE for d in spec.submodule_search_locations or ()]
    for path in candidates:
        if path.is_file():
            return path
    raise RuntimeError(
        f"CLIP's BPE vocabulary ({_BPE_FILE}) was not found: it ships with open_clip_torch. "
        "Install it with `pip install --no-deps open_clip_torch` (its data file is all we use)."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id) and merges ("a b" lines), as OpenAI's SimpleTokenizer builds them."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"unexpected CLIP vocabulary size {len(tokens)} (expected {VOCAB_SIZE})")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(
    out_dir: str | Path, *, pad_token: str = EOS_TOKEN, model_max_length: int = 77
) -> None:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) as published SD checkpoints carry it.

    ``pad_token``: ``"<|endoftext|>"`` for SD1.x (pad id 49407), ``"!"`` for SD2.x (pad id 0).
    """
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": pad_token, "unk_token": EOS_TOKEN}
    config = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
