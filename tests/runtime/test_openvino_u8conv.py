"""int8 convolutions without zero points (:mod:`latentrt.runtime.engines.openvino_u8conv`): the rewritten graph
computes what the quantized one does (borders included), stays int8 on the CPU plugin, and leaves alone what
it cannot rewrite exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")
ops = pytest.importorskip("openvino.opset13")

from latentrt.runtime.engines.openvino_u8conv import SUFFIX, unsigned_conv_inputs  # noqa: E402


def _c(v, dtype=np.float32):
    return ops.constant(np.asarray(v, dtype))


def _grid(lo, hi, levels=256):
    """NNCF's asymmetric range: zero moved onto the grid."""
    step = (hi - lo) / (levels - 1)
    zero = round(-lo / step)
    return np.float32(-zero * step), np.float32((levels - 1 - zero) * step)


def _fq(x, lo, hi, levels=256, out=None):
    olo, ohi = out or (lo, hi)
    return ops.fake_quantize(x, _c(lo), _c(hi), _c(olo), _c(ohi), levels)


def _weights(rng, o, i, k):
    """int8 weights as NNCF stores them: Constant(i8) -> Convert -> Multiply(per-channel scale)."""
    q = rng.integers(-127, 128, (o, i, k, k)).astype(np.int8)
    scale = rng.uniform(0.001, 0.01, (o, 1, 1, 1)).astype(np.float32)
    return ops.multiply(ops.convert(ops.constant(q), "f32"), _c(scale))


def _conv(x, w, stride=1, pad=1, bias=None, rng=None):
    y = ops.convolution(x, w, [stride, stride], [pad, pad], [pad, pad], [1, 1])
    if bias == "per_channel":
        channels = w.get_output_partial_shape(0)[0].get_length()
        return ops.add(y, _c(rng.standard_normal((1, channels, 1, 1))))
    if bias == "scalar":
        return ops.add(y, _c(0.25))
    return y


def _run(model, x, hint="f32"):
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 1})
    request = compiled.create_infer_request()
    request.infer({0: x})
    return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))], compiled


def _network(lo=-0.3, hi=5.0, seed=0, channels=8):
    """Three quantized convolutions the way the SD UNet has them (SiLU -> FakeQuantize -> conv): 3x3 with a
    per-channel bias, 3x3 stride 2 with no bias whose output has two consumers, 1x1 with a scalar bias and a
    ShapeOf reading it."""
    rng = np.random.default_rng(seed)
    lo, hi = _grid(lo, hi)
    x = ops.parameter([1, channels, 12, 12], np.float32, name="x")
    h = _conv(_fq(ops.swish(x), lo, hi), _weights(rng, channels, channels, 3), bias="per_channel", rng=rng)
    d = _conv(_fq(ops.swish(h), lo, hi), _weights(rng, channels, channels, 3), stride=2)
    two = ops.add(ops.multiply(d, _c(0.5)), ops.swish(d))
    p = _conv(_fq(ops.swish(two), lo, hi), _weights(rng, channels, channels, 1), pad=0, bias="scalar")
    shape = ops.shape_of(p)
    return ov.Model([p.output(0), shape.output(0)], [x])


def _input(seed=1, channels=8, size=12):
    return (np.random.default_rng(seed).standard_normal((1, channels, size, size)) * 2).astype(np.float32)


def _fq_lows_before_convs(model):
    return [float(op.input_value(0).get_node().input_value(3).get_node().get_data().reshape(-1)[0])
            for op in model.get_ops() if op.get_type_name() == "Convolution"
            and op.input_value(0).get_node().get_type_name() == "FakeQuantize"]


def test_rewrite_matches_the_quantized_graph_borders_included():
    x = _input()
    (want, want_shape), _ = _run(_network(), x)
    model = _network()
    assert unsigned_conv_inputs(model) == 3
    lows = _fq_lows_before_convs(model)
    assert len(lows) == 3 and all(v == 0.0 for v in lows), "every convolution's input is unsigned"
    assert sum(op.get_friendly_name().endswith(SUFFIX) for op in model.get_ops()) == 3
    (got, got_shape), _ = _run(model, x)
    assert got.shape == want.shape and (got_shape == want_shape).all()
    scale = np.abs(want).max()
    err = np.abs(got - want)
    # the same integers reach the kernels; what differs is float rounding of the bias correction
    assert err.max() <= 1e-4 * scale, (err.max(), scale)
    # the borders (where the explicit Pad stands for the old zero padding) are as close as the middle
    assert err[..., [0, -1], :].max() <= 1e-4 * scale and err[..., :, [0, -1]].max() <= 1e-4 * scale


def test_border_padding_is_needed():
    """Without the explicit Pad (zeros after the shift are -lo before it) the borders are wrong: the test
    above would catch a rewrite that dropped it."""
    rng = np.random.default_rng(0)
    lo, hi = _grid(-0.3, 5.0)
    x = ops.parameter([1, 4, 8, 8], np.float32, name="x")
    w = _weights(rng, 4, 4, 3)
    plain = ov.Model([_conv(_fq(x, lo, hi), w)], [x])
    sh = ops.add(x, _c(-lo))
    unpadded = ops.add(_conv(_fq(sh, 0.0, hi - lo), w), _c(0.0))  # no Pad, no correction: only the middle is off by a constant
    wrong = ov.Model([unpadded], [x])
    data = _input(channels=4, size=8)
    (a,), _ = _run(plain, data)
    (b,), _ = _run(wrong, data)
    d = b - a
    middle = d[..., 1:-1, 1:-1]
    assert np.ptp(middle, axis=(2, 3)).max() < 1e-3 * np.abs(a).max()  # a per-channel constant inside
    assert np.abs(d[..., 0, :] - middle[..., :1, :1].reshape(1, 4, 1)).max() > 1e-2 * np.abs(a).max()  # not at the border


def test_compiled_model_stays_int8():
    """The CPU plugin still runs the rewritten convolutions on int8 kernels (a Pad between the FakeQuantize and
    the convolution, for one, made it fall back to bf16)."""
    model = _network(channels=32)
    unsigned_conv_inputs(model)
    _, compiled = _run(model, _input(channels=32), hint="bf16")
    kernels = [op.get_rt_info()["primitiveType"].astype(str) for op in compiled.get_runtime_model().get_ops()
               if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert kernels and all("I8" in k or "i8" in k for k in kernels), kernels


@pytest.mark.parametrize("case", ["per_channel_range", "unsigned_already", "zero_off_grid", "not_quantized",
                                  "output_range_differs", "255_levels"])
def test_left_alone(case):
    rng = np.random.default_rng(0)
    x = ops.parameter([1, 4, 6, 6], np.float32, name="x")
    lo, hi = _grid(-0.3, 5.0)
    if case == "per_channel_range":
        q = ops.fake_quantize(x, _c(np.full((1, 4, 1, 1), lo)), _c(np.full((1, 4, 1, 1), hi)),
                              _c(np.full((1, 4, 1, 1), lo)), _c(np.full((1, 4, 1, 1), hi)), 256)
    elif case == "unsigned_already":
        q = _fq(x, 0.0, 5.0)
    elif case == "zero_off_grid":
        q = _fq(x, -0.3011, 5.0)  # -lo is not a whole number of steps
    elif case == "not_quantized":
        q = ops.swish(x)
    elif case == "255_levels":
        q = _fq(x, -1.0, 1.0, levels=255)
    else:
        q = _fq(x, lo, hi, out=(lo, 2 * hi))
    model = ov.Model([_conv(q, _weights(rng, 4, 4, 3))], [x])
    assert unsigned_conv_inputs(model) == 0
    assert not any(op.get_friendly_name().endswith(SUFFIX) for op in model.get_ops())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lo=st.floats(-8.0, -0.01), span=st.floats(0.5, 20.0),
       stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1, 2]), kernel=st.sampled_from([1, 3]),
       size=st.integers(5, 11), seed=st.integers(0, 2**16))
def test_rewrite_is_exact_property(lo, span, stride, pad, kernel, size, seed):
    """Over ranges, strides, paddings and sizes, the rewritten convolution gives what the quantized one does,
    and both what the FakeQuantize's arithmetic followed by the convolution gives (numpy, float64)."""
    rng = np.random.default_rng(seed)
    levels = 256
    step = span / (levels - 1)
    zero = max(1, round(-lo / step))
    lo, hi = np.float32(-zero * step), np.float32((levels - 1 - zero) * step)
    assume(hi > 0)
    channels = 4

    def build():
        r = np.random.default_rng(seed)
        x = ops.parameter([1, channels, size, size], np.float32, name="x")
        return ov.Model([_conv(_fq(x, lo, hi, levels), _weights(r, channels, channels, kernel), stride=stride, pad=pad,
                               bias="per_channel", rng=r)], [x])

    data = (rng.standard_normal((1, channels, size, size)) * max(abs(lo), hi)).astype(np.float32)
    (want,), _ = _run(build(), data)
    model = build()
    assert unsigned_conv_inputs(model) == 1
    (got,), _ = _run(model, data)
    assert got.shape == want.shape
    tol = 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(got - want).max() <= tol
    assert np.abs(got - _reference(build(), data)).max() <= tol


def _reference(model, data):
    """The quantized convolution of ``model`` (FakeQuantize -> Convolution -> Add), in numpy float64."""
    from latentrt.runtime.engines.openvino_u8conv import _folded

    conv = next(op for op in model.get_ops() if op.get_type_name() == "Convolution")
    fq = conv.input_value(0).get_node()
    lo, hi = (float(_folded(fq.input_value(i)).reshape(-1)[0]) for i in (1, 2))
    step = (hi - lo) / 255
    x = np.round((np.clip(data.astype(np.float64), lo, hi) - lo) / step) * step + lo
    w = _folded(conv.input_value(1)).astype(np.float64)
    attrs = conv.get_attributes()
    (p0, p1), (e0, e1), (s0, s1) = attrs["pads_begin"], attrs["pads_end"], attrs["strides"]
    x = np.pad(x, ((0, 0), (0, 0), (p0, e0), (p1, e1)))
    k = w.shape[2]
    oh, ow = (x.shape[2] - k) // s0 + 1, (x.shape[3] - k) // s1 + 1
    out = np.zeros((1, w.shape[0], oh, ow))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + s0 * (oh - 1) + 1:s0, j:j + s1 * (ow - 1) + 1:s1]
            out += np.einsum("oc,nchw->nohw", w[:, :, i, j], patch)
    add = next(iter(conv.output(0).get_target_inputs())).get_node()
    return out + _folded(add.input_value(1)).astype(np.float64)
