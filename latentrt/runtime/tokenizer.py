"""CLIP tokenizer for the runtime: numpy + the ``tokenizers`` library, no torch or transformers.

Gives the same ids as ``transformers.CLIPTokenizer`` (transformers 5, tokenizers-backed) called
with ``padding="max_length", max_length=model_max_length, truncation=True``. Like transformers 5,
the normalizer / pre-tokenizer are always CLIP's own; only the vocabulary, merges and special tokens
come from the folder, so ``tokenizer.json`` and ``vocab.json`` + ``merges.txt`` behave the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

__all__ = ["CLIPTokenizer"]

_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_EOW = "</w>"
_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(value) -> str | None:
    """A special token as configs write it: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_token(d: dict) -> AddedToken:
    return AddedToken(
        d["content"],
        single_word=d.get("single_word", False),
        lstrip=d.get("lstrip", False),
        rstrip=d.get("rstrip", False),
        normalized=d.get("normalized", False),
        special=d.get("special", True),
    )


class CLIPTokenizer:
    """CLIP's byte-level BPE with bos/eos, right truncation and right padding, returning numpy ids."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = _DEFAULTS["bos_token"],
        eos_token: str = _DEFAULTS["eos_token"],
        pad_token: str = _DEFAULTS["pad_token"],
        unk_token: str = _DEFAULTS["unk_token"],
        model_max_length: int = 77,
        added_tokens: Sequence[dict] = (),
    ):
        for name, tok in [("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)]:
            if tok not in vocab:
                raise ValueError(f"CLIP tokenizer: {name} token {tok!r} is not in the vocabulary")
        model = BPE(
            vocab=vocab,
            merges=list(merges),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=_EOW,
            fuse_unk=False,
            unk_token=unk_token,
        )
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # transformers registers every special token (pad too: "!" for SD2) as an added token that
        # is matched in the raw text before normalization.
        specials = dict.fromkeys([bos_token, eos_token, unk_token, pad_token])
        tok.add_tokens([_added_token(d) for d in added_tokens if not d.get("special", True)])
        tok.add_special_tokens(
            [_added_token(d) for d in added_tokens if d.get("special", True) and d["content"] not in specials]
            + [AddedToken(t, normalized=False, special=True) for t in specials]
        )
        self._tok = tok
        self.model_max_length = int(model_max_length)
        self.bos_token_id = vocab[bos_token]
        self.eos_token_id = vocab[eos_token]
        self.pad_token_id = vocab[pad_token]

    @classmethod
    def from_dir(cls, path: str | Path) -> "CLIPTokenizer":
        """Load a tokenizer folder: ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, with
        ``tokenizer_config.json`` / ``special_tokens_map.json`` for special tokens and max length."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
        config = _read_json(path / "tokenizer_config.json")
        tokens = {k: _token_str(config.get(k)) or v for k, v in _DEFAULTS.items()}
        for k, v in _read_json(path / "special_tokens_map.json").items():
            if k in tokens and _token_str(v):
                tokens[k] = _token_str(v)
        added = [d for d in (config.get("added_tokens_decoder") or {}).values() if isinstance(d, dict)]

        if (path / "tokenizer.json").is_file():
            data = _read_json(path / "tokenizer.json")
            model = data.get("model") or {}
            if model.get("type") != "BPE":
                raise ValueError(f"{path / 'tokenizer.json'}: expected a BPE model, found {model.get('type')!r}")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            added += data.get("added_tokens") or []
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = _read_json(path / "vocab.json")
            lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
        else:
            raise FileNotFoundError(
                f"no tokenizer files in {str(path)!r}: expected 'tokenizer.json', or 'vocab.json' and "
                f"'merges.txt' (found: {sorted(p.name for p in path.iterdir()) or 'nothing'})"
            )
        return cls(
            vocab,
            merges,
            **tokens,
            model_max_length=config.get("model_max_length", 77),
            added_tokens=added,
        )

    def _encode(self, texts: str | Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            texts = [texts]
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates, e.g. from bytes decoded with errors="surrogateescape"
                raise ValueError(f"prompt {t[:60]!r} is not valid Unicode text ({e.reason} at position {e.start}); "
                                 "decode it with errors='replace'") from None
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        padding: str = "max_length",
        truncation: bool = True,
    ) -> np.ndarray:
        """Token ids, int64 of shape (batch, length): ``[bos, ..., eos, pad, ...]``.

        ``padding="max_length"`` pads to ``max_length`` (default ``model_max_length``);
        ``"longest"`` pads to the longest sequence of the batch. With ``truncation`` sequences are
        cut to ``max_length`` (eos kept); without it the array is as wide as the longest sequence.
        """
        max_length = self.model_max_length if max_length is None else int(max_length)
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', not {padding!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (bos + eos), got {max_length}")
        seqs = [[self.bos_token_id, *ids, self.eos_token_id] for ids in self._encode(texts)]
        if truncation:
            seqs = [s if len(s) <= max_length else s[: max_length - 1] + [self.eos_token_id] for s in seqs]
        longest = max(len(s) for s in seqs)
        width = max(longest, max_length) if padding == "max_length" else longest
        out = np.full((len(seqs), width), self.pad_token_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
        return out

    def untruncated_length(self, texts: str | Sequence[str]) -> list[int]:
        """Token count of each text with bos and eos, before truncation."""
        return [len(ids) + 2 for ids in self._encode(texts)]

    def decode(self, ids) -> str:
        """Text of token ids, as transformers' CLIPTokenizer.decode gives it (special tokens kept)."""
        text = self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)
        return text.replace(_EOW, " ").strip()
