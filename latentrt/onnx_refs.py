"""The files an ONNX model refers to (its external data), read without loading a weight.

An ONNX tensor may keep its bytes in another file (``data_location = EXTERNAL`` with an
``external_data`` entry ``location``, relative to the model's folder). A bundle must never make the
runtime read a file outside it, so the locations are checked before any engine opens the model
(:func:`latentrt.manifest.check_external_data`). Reading them with the ``onnx`` package would parse
every weight into memory and needs an export-only dependency; this module walks the protobuf wire
format of the memory-mapped file instead and skips every field it does not need (weights stored in
the file are skipped by their length, never copied). Pure stdlib.

Where tensors live in a ``ModelProto`` (field numbers from onnx.proto): ``graph`` (7) and
``functions`` (25); a ``GraphProto``'s ``initializer`` (5), ``sparse_initializer`` (15) and ``node``
(1); a ``NodeProto``'s ``attribute`` (5); an ``AttributeProto``'s ``t`` (5), ``g`` (6), ``tensors``
(10), ``graphs`` (11), ``sparse_tensor`` (22), ``sparse_tensors`` (23); a ``SparseTensorProto``'s
``values`` (1) and ``indices`` (2); a ``FunctionProto``'s ``node`` (7). A ``TensorProto`` names its
file in ``external_data`` (13), a ``StringStringEntryProto`` of ``key`` (1) and ``value`` (2).
"""

from __future__ import annotations

import functools
import mmap
import os
from typing import Iterator

_VARINT, _I64, _LEN, _START_GROUP, _END_GROUP, _I32 = 0, 1, 2, 3, 4, 5


class OnnxFormatError(ValueError):
    """The file is not a well-formed ONNX protobuf."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("truncated or malformed varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _skip(buf, pos: int, end: int, wire: int, field: int) -> int:
    """The position after a field's value (of a wire type other than length-delimited)."""
    if wire == _VARINT:
        return _varint(buf, pos, end)[1]
    if wire in (_I64, _I32):
        return pos + (8 if wire == _I64 else 4)
    if wire == _START_GROUP:  # deprecated groups: skipped as protobuf parsers do, up to their end tag
        while True:
            tag, pos = _varint(buf, pos, end)
            if tag & 7 == _END_GROUP:
                if tag >> 3 != field:
                    raise OnnxFormatError("mismatched protobuf group")
                return pos
            if tag & 7 == _LEN:
                n, pos = _varint(buf, pos, end)
                pos += n
            else:
                pos = _skip(buf, pos, end, tag & 7, tag >> 3)
    raise OnnxFormatError(f"unexpected protobuf wire type {wire}")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each length-delimited field of the message in
    ``buf[start:end]``; other fields are skipped."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == _LEN:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise OnnxFormatError("a field runs past the end of its message (truncated file?)")
            yield field, wire, pos, pos + n
            pos += n
        else:
            pos = _skip(buf, pos, end, wire, field)
    if pos != end:
        raise OnnxFormatError("a field runs past the end of its message (truncated file?)")


def _sub(buf, start, end, wanted: int):
    return ((s, e) for f, _, s, e in _fields(buf, start, end) if f == wanted)


def _tensor_locations(buf, start, end) -> Iterator[str]:
    for s, e in _sub(buf, start, end, 13):  # external_data
        entry = {f: bytes(buf[a:b]).decode("utf-8", "replace") for f, _, a, b in _fields(buf, s, e)}
        if entry.get(1) == "location":
            yield entry.get(2, "")


def _sparse_locations(buf, start, end) -> Iterator[str]:
    for f, _, s, e in _fields(buf, start, end):
        if f in (1, 2):  # values, indices
            yield from _tensor_locations(buf, s, e)


def _node_locations(buf, start, end) -> Iterator[str]:
    for s, e in _sub(buf, start, end, 5):  # attribute
        for f, _, a, b in _fields(buf, s, e):
            if f in (5, 10):  # t, tensors
                yield from _tensor_locations(buf, a, b)
            elif f in (6, 11):  # g, graphs
                yield from _graph_locations(buf, a, b)
            elif f in (22, 23):  # sparse_tensor, sparse_tensors
                yield from _sparse_locations(buf, a, b)


def _graph_locations(buf, start, end) -> Iterator[str]:
    for f, _, s, e in _fields(buf, start, end):
        if f == 5:
            yield from _tensor_locations(buf, s, e)
        elif f == 15:
            yield from _sparse_locations(buf, s, e)
        elif f == 1:
            yield from _node_locations(buf, s, e)


def external_data_locations(path: str | os.PathLike) -> list[str]:
    """The ``location`` of every external-data tensor of the ONNX model at ``path``, in file order,
    without duplicates (as written in the model: relative to its folder). Remembered per file, size
    and mtime (loading a bundle asks twice: verification, then the engine)."""
    st = os.stat(path)
    return list(_locations(os.path.realpath(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _locations(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OnnxFormatError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            found: dict[str, None] = {}
            for field, _, s, e in _fields(buf, 0, size):
                if field == 7:  # graph
                    found.update(dict.fromkeys(_graph_locations(buf, s, e)))
                elif field == 25:  # functions
                    for a, b in _sub(buf, s, e, 7):
                        found.update(dict.fromkeys(_node_locations(buf, a, b)))
            return tuple(found)
