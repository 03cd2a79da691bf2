"""Textual-inversion embeddings added to a pipeline before export (``--textual-inversion FILE[:TOKEN]``).

Each embedding becomes new tokens of the bundle's tokenizer(s) and new rows of the text encoder's
embedding table, through diffusers' own ``load_textual_inversion`` (so prompts give diffusers' image).
A multi-vector embedding ``<t>`` is added as ``<t>``, ``<t>_1``, ...; the runtime tokenizer spells a
prompt's ``<t>`` out as all of them, as diffusers' ``maybe_convert_prompt`` does.

Formats: diffusers ``learned_embeds`` (one key: token -> vectors), A1111 ``.pt`` (``string_to_param``)
and ``.safetensors`` (``emb_params``), SDXL files with ``clip_l`` / ``clip_g`` (one table per text
encoder). ``.pt`` / ``.bin`` files are pickles, which run code when loaded: they are refused unless
``allow_pickle``. The token defaults to the file's own (diffusers, A1111 ``name``) or its file name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")


class TextualInversionError(ValueError):
    pass


@dataclass(frozen=True)
class TextualInversion:
    source: str
    token: str | None = None

    @classmethod
    def parse(cls, text) -> "TextualInversion":
        """``FILE_OR_ID[:TOKEN]`` (a path, or a ``(source, token)`` pair)."""
        if isinstance(text, TextualInversion):
            return text
        if isinstance(text, (tuple, list)):
            return cls(str(text[0]), text[1] if len(text) > 1 else None)
        text = str(text)
        src, sep, token = text.rpartition(":")
        if sep and src and token and "/" not in token and "\\" not in token:
            return cls(src, token)
        return cls(text, None)


def _load_file(path: Path, allow_pickle: bool) -> dict:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise TextualInversionError(
                f"{path}: {path.suffix} files are Python pickles, which run code when loaded; pass --allow-pickle "
                "if you trust it (or use a .safetensors embedding)")
        import torch

        data = torch.load(str(path), map_location="cpu", weights_only=False)
    else:
        from safetensors.torch import load_file

        data = load_file(str(path))
    if not isinstance(data, dict):
        raise TextualInversionError(f"{path}: not a textual-inversion file (a {type(data).__name__}, not a dict)")
    return data


def _rows(emb, token: str, encoder, where: str):
    """``emb`` as (n, width) rows, checked against ``encoder``'s embedding width."""
    emb = emb.detach().float()
    emb = emb[None] if emb.ndim == 1 else emb
    width = encoder.get_input_embeddings().weight.shape[-1]
    if emb.ndim != 2 or emb.shape[-1] != width:
        raise TextualInversionError(
            f"{where}: the embedding of {token!r} has shape {tuple(emb.shape)} but the text encoder's tokens are "
            f"{width} wide; it was trained for another model (SD 1.x: 768, SD 2.x: 1024, SDXL: clip_l 768 + clip_g "
            "1280)")
    return emb


def _tables(data: dict, ti: TextualInversion, path: Path, sdxl: bool) -> tuple[str, dict]:
    """(token, {"clip_l": rows, "clip_g": rows?}) from any of the supported layouts."""
    if "clip_l" in data or "clip_g" in data:
        if not sdxl or "clip_l" not in data or "clip_g" not in data:
            raise TextualInversionError(f"{path}: an SDXL embedding (clip_l / clip_g) needs an SDXL pipeline and "
                                        "both tables")
        return ti.token or path.stem, {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    if "string_to_param" in data:  # A1111 .pt
        return ti.token or str(data.get("name") or path.stem), {"clip_l": data["string_to_param"]["*"]}
    if "emb_params" in data:  # A1111 .safetensors
        return ti.token or path.stem, {"clip_l": data["emb_params"]}
    if len(data) == 1:  # diffusers learned_embeds
        token, emb = next(iter(data.items()))
        return ti.token or token, {"clip_l": emb}
    raise TextualInversionError(f"{path}: not a textual-inversion file (keys {sorted(data)[:8]}); expected diffusers' "
                                "learned_embeds (one key), A1111 (string_to_param / emb_params) or SDXL (clip_l, clip_g)")


def add_textual_inversions(pipe, items, *, allow_pickle: bool = False) -> list[dict]:
    """Add every embedding to ``pipe`` (in place) with diffusers' ``load_textual_inversion``; one record
    per embedding for the manifest (``extra["textual_inversion"]``)."""
    records = []
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    for item in items:
        ti = TextualInversion.parse(item)
        path = Path(ti.source)
        if not path.is_file():
            raise TextualInversionError(f"textual inversion {ti.source!r}: no such file (give a local .safetensors "
                                        "file; hub downloads are not supported here)")
        token, tables = _tables(_load_file(path, allow_pickle), ti, path, sdxl)
        targets = {"clip_l": (pipe.text_encoder, pipe.tokenizer)}
        if "clip_g" in tables:
            targets["clip_g"] = (pipe.text_encoder_2, pipe.tokenizer_2)
        for key, (encoder, tokenizer) in targets.items():
            rows = _rows(tables[key], token, encoder, f"{path} ({key})" if len(targets) > 1 else str(path))
            if token in tokenizer.get_vocab():
                raise TextualInversionError(f"{path}: the token {token!r} is already in the tokenizer's vocabulary; "
                                            f"name another with {path}:<TOKEN>")
            pipe.load_textual_inversion(rows, token=token, text_encoder=encoder, tokenizer=tokenizer)
        records.append({"source": str(path), "token": token, "vectors": int(rows.shape[0]), "encoders": list(targets)})
    return records
