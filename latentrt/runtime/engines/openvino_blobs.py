"""Compiled OpenVINO models imported straight from their cache folder (issue 18, cold start).

OpenVINO's model cache (CACHE_DIR) finds a compiled blob by hashing the model object, so a new process
must first read the IR (mapping its weights: 1.7 GB of RSS for the SD1.5 UNet) and, for static
shapes, reshape it, before OpenVINO can even look the blob up. Each of our cache folders holds the
blob of exactly one (model, precision, shapes, OpenVINO version, threads) key
(:func:`.openvino.compiled_key`), so once a compile has written it we record which file it is in
``latentrt.json`` beside it, and a later process maps that file and hands it to ``import_model``
directly: no IR read, no reshape, no hash. For the full-size SD1.5 LCM pipeline (2-core EPYC, bf16,
static shapes) a new process's first-use imports of its three models went from 2.08-2.97 s to 1.37-1.76 s
and its peak RSS from 5.37 to 4.39 GiB (``benchmarks/cold_start.py``, the figures in ``benchmarks/RESULTS.md``).

OpenVINO's blob is its own format: an XML header line naming the OpenVINO version, then the plugin's
export. A blob whose header is not the one expected (another OpenVINO version, a header alignment
this code does not know, a size other than recorded) is not imported here; the engine then takes
OpenVINO's own path, which checks the blob itself (and compiles again what it cannot import). The mapping stays open for the compiled model's
life (it is an attribute of the compiled model's Python object): OpenVINO's CPU plugin keeps pointers
into it (closing it under a live model crashed).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path

import numpy as np

from ...manifest import write_json_atomic

logger = logging.getLogger("latentrt")

RECORD = "latentrt.json"
_HEADER_MAX = 4096


def _shapes_to_json(shapes):
    return None if shapes is None else [[n, list(s)] for n, s in shapes]


def record(folder: Path, fields: dict, shapes) -> None:
    """After a compile wrote its blob into ``folder``: note which file it is (the newest ``.blob``)
    with its size and the key's fields. Written atomically; a folder without a record is simply
    left to OpenVINO's own lookup."""
    blobs = sorted(folder.glob("*.blob"), key=lambda p: p.stat().st_mtime_ns)
    if not blobs:
        return
    blob = blobs[-1]
    try:
        write_json_atomic(folder / RECORD, {**fields, "shapes": _shapes_to_json(shapes), "blob": blob.name,
                                            "size": blob.stat().st_size})
    except OSError as e:  # read-only or full cache: the next process takes OpenVINO's lookup
        logger.debug("could not record %s: %s", folder, e)


def _read_record(folder: Path) -> dict | None:
    try:
        rec = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def import_recorded(ov, core, folder: Path, device: str, config: dict, fields: dict):
    """The compiled model of the blob recorded in ``folder`` (holding the blob's mapping), or None
    where there is no usable record (the caller then compiles through OpenVINO's cache)."""
    rec = _read_record(folder)
    if rec is None or any(rec.get(k) != v for k, v in fields.items()):
        return None
    name = rec.get("blob")
    if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".blob"):
        return None
    path = folder / name
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != rec.get("size"):
                return None
            # copy-on-write (MAP_PRIVATE on POSIX, the same on Windows): OpenVINO's tensor wants a writable
            # buffer; pages it never writes stay the page cache's (nothing is copied), and nothing written
            # reaches the file
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    head = bytes(mapping[:_HEADER_MAX])
    end = head.find(b"/>\n")
    if (not head.startswith(b"<?xml") or end < 0 or b"<compiled_blob" not in head[:end]
            or f'ie_version="{ov.__version__}"'.encode() not in head[:end]
            or b'header_size_alignment="0"' not in head[:end]):
        mapping.close()
        return None
    try:
        data = np.frombuffer(mapping, dtype=np.uint8, offset=end + 3)
        compiled = core.import_model(ov.Tensor(data, shared_memory=True), device, config)
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own RuntimeError kinds; fall back
        logger.info("could not import %s directly (%s: %s); compiling through OpenVINO's cache", path,
                    type(e).__name__, str(e).strip()[:200])
        return None
    # the mapping lives exactly as long as the compiled model's Python object: a pipeline's entry holds
    # (compiled model, infer request), which Python releases request first
    compiled._latentrt_blob = (mapping, data)
    return compiled
