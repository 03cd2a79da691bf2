"""int8 convolutions on OpenVINO's CPU plugin without zero-point compensation: activations shifted to unsigned.

Why: NNCF quantizes a convolution's input asymmetrically (per tensor, ``low < 0 < high``: a SiLU's output
spans about [-0.28, 5]), which the plugin runs as u8 activations *with a zero point*. oneDNN then needs, for
every output channel, the sum of the weights times the zero point, and computes it while it reorders the
int8 weights into the kernel's blocked layout. That reorder is slow: on a 2-core AMD EPYC (AVX512-VNNI, no
AMX) it ran at about 210 MB/s of int8 weights, and it runs again in every new process, at blob import (the
compiled blob stores the plain weights). Importing the SD1.5 UNet's int8 blob took 4.2-4.4 s, half of its
CPU time in ``jit_uni_reorder_kernel_f32`` (``perf record`` with ``ONEDNN_JIT_PROFILE=2``). A probe of eight
1280x1280 3x3 convolutions imported in 0.56-0.67 s with a zero point (or with signed activations, whose s8s8
compensation costs the same) and in 0.13-0.16 s with unsigned activations and no zero point; their
inference was no slower. With this rewrite the UNet's blob imports in 1.99-2.05 s against 4.34-4.48 s (new
processes, interleaved; ``benchmarks/RESULTS.md``, "int8 convolutions without zero points"), and its step and
the VAE decode are as fast as before within this machine's noise (interleaved per-op counters: the
convolutions 4-7% faster, the Pads 6 ms per UNet step and 76 ms per 512x512 VAE decode).

:func:`unsigned_conv_inputs` rewrites each ``FakeQuantize(x; lo, hi) -> Convolution(W, pads)`` with ``lo < 0``
into the same computation on ``x - lo``, which is unsigned with no zero point:

    Add(x, -lo) -> Pad(pads, value=-lo) -> FakeQuantize(0, hi - lo) -> Convolution(W, no padding) -> + lo * sum(W)

- The grid is the same: NNCF puts zero on it (``-lo`` is a whole number of steps), so ``x - lo`` quantizes to
  the same integers, and the dequantized input is the old one plus ``-lo``.
- Padding: the convolution padded the quantized input with zeros, which are ``-lo`` after the shift, so the
  padding becomes an explicit Pad with that value (the result is exact at the borders too).
- ``conv(y - lo) = conv(y) - lo * sum(W)`` per output channel: the difference joins the convolution's bias
  (an ``Add`` of a per-channel constant that the plugin fuses into the kernel and applies in f32), or an Add
  of its own where there is no such bias.

Only what matches exactly is rewritten: a per-tensor 256-level FakeQuantize whose input and output ranges
agree and whose zero is on the grid, weights that are constants (through Convert / Subtract / Multiply, as NNCF stores
them), explicit padding. The rest is left as it is.
"""

from __future__ import annotations

import numpy as np

#: part of the int8 IR's cache key (:func:`.openvino_int8.int8_ir`): bump it when the rewrite changes
VERSION = "u8c1"
#: the friendly-name suffix of the Add that shifts a rewritten convolution's input
SUFFIX = "/u8_shift"
#: the level count of the quantizers rewritten: NNCF's activation quantizers, what was measured (with 255, for
#: one, the plugin's own int8 mapping already differed from the FakeQuantize's arithmetic, rewritten or not)
LEVELS = 256


def _folded(value):
    """The numpy value of a constant subgraph (Constant through Convert, Subtract, Multiply), or None."""
    node = value.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return np.asarray(node.get_data())
    if kind == "Convert":
        inner = _folded(node.input_value(0))
        return None if inner is None else inner.astype(np.float32)
    if kind in ("Subtract", "Multiply"):
        a, b = _folded(node.input_value(0)), _folded(node.input_value(1))
        if a is None or b is None:
            return None
        a, b = a.astype(np.float32), b.astype(np.float32)
        return a - b if kind == "Subtract" else a * b
    return None


def _scalar(value) -> float | None:
    data = _folded(value)
    return float(data.reshape(-1)[0]) if data is not None and data.size == 1 else None


def _range(fq):
    """(lo, hi) of a per-tensor :data:`LEVELS`-level FakeQuantize that maps [lo, hi] onto itself with zero on
    its grid and lo < 0 (else None)."""
    lo, hi, olo, ohi = (_scalar(fq.input_value(i)) for i in range(1, 5))
    if None in (lo, hi, olo, ohi) or int(fq.get_attributes()["levels"]) != LEVELS or not lo < 0 < hi:
        return None
    if not (np.isclose(lo, olo, rtol=1e-6, atol=0) and np.isclose(hi, ohi, rtol=1e-6, atol=0)):
        return None
    zero = -lo / ((hi - lo) / (LEVELS - 1))
    if abs(zero - round(zero)) > 1e-3:  # zero between two levels: its padding would not stay zero
        return None
    return lo, hi


def _bias_add(conv, channels: int):
    """(the Add, its bias as [channels]) where the convolution's only consumer besides ShapeOf ops adds a
    constant scalar or per-channel bias ([C, 1, 1] or [1, C, 1, 1] for a 2-D convolution), else (None, None)."""
    targets = [t.get_node() for t in conv.output(0).get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
    if len(targets) != 1 or targets[0].get_type_name() != "Add":
        return None, None
    add = targets[0]
    mine = [i for i in (0, 1) if add.input_value(i).get_node().get_instance_id() == conv.get_instance_id()]
    bias = _folded(add.input_value(1 - mine[0])) if len(mine) == 1 else None
    if bias is None:
        return None, None
    if bias.size == 1:
        return add, np.full(channels, float(bias.reshape(-1)[0]), np.float32)
    spatial = conv.get_output_partial_shape(0).rank.get_length() - 2
    shape = list(bias.shape)
    while len(shape) > spatial + 1 and shape[0] == 1:
        shape.pop(0)
    if shape != [channels] + [1] * spatial:
        return None, None
    return add, bias.reshape(-1).astype(np.float32)


def unsigned_conv_inputs(model) -> int:
    """Rewrite every int8 convolution of ``model`` (an ``openvino.Model`` quantized by NNCF, in place) whose
    input is quantized with a zero point to unsigned input without one (see the module docstring); returns
    how many."""
    import openvino.opset13 as ops

    count = 0
    for conv in [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]:
        fq = conv.input_value(0).get_node()
        if fq.get_type_name() != "FakeQuantize":
            continue
        found = _range(fq)
        weights = _folded(conv.input_value(1))
        attrs = conv.get_attributes()
        if found is None or weights is None or attrs.get("auto_pad", "explicit") not in ("explicit", "notset"):
            continue
        x = fq.input_value(0)
        if x.get_element_type().get_type_name() != "f32":
            continue
        lo, hi = found
        rank = weights.ndim
        begin, end = list(attrs["pads_begin"]), list(attrs["pads_end"])
        channels = weights.shape[0]
        correction = (lo * weights.reshape(channels, -1).sum(axis=1, dtype=np.float64)).astype(np.float32)
        add, bias = _bias_add(conv, channels)

        def f32(v):
            return ops.constant(np.asarray(v, np.float32))

        shifted = ops.add(x, f32(-lo))
        shifted.set_friendly_name(conv.get_friendly_name() + SUFFIX)
        h = shifted
        if any(begin) or any(end):
            pads = lambda p: ops.constant(np.array([0, 0, *p], np.int64))  # noqa: E731
            h = ops.pad(h, pads(begin), pads(end), "constant", f32(-lo))
        h = ops.fake_quantize(h, f32(0.0), f32(hi - lo), f32(0.0), f32(hi - lo), LEVELS)
        zeros = [0] * (rank - 2)
        new = ops.convolution(h, conv.input_value(1), attrs["strides"], zeros, zeros, attrs["dilations"])
        new.set_friendly_name(conv.get_friendly_name())
        per_channel = [1, channels] + [1] * (rank - 2)
        for t in list(conv.output(0).get_target_inputs()):
            if t.get_node().get_type_name() == "ShapeOf":  # the shape is the same
                t.replace_source_output(new.output(0))
        if add is not None:
            added = ops.add(new, f32((bias + correction).reshape(per_channel)))
            added.set_friendly_name(add.get_friendly_name())
            add.output(0).replace(added.output(0))
        else:
            added = ops.add(new, f32(correction.reshape(per_channel)))
            added.set_friendly_name(conv.get_friendly_name() + "/u8_correction")
            conv.output(0).replace(added.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count
