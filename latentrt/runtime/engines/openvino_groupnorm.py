"""GroupNorm on OpenVINO's CPU plugin without the layout round trip: statistics per channel, then per group.

Why: torch exports ``GroupNorm`` to ONNX as ``Reshape(x, [N, G, -1])`` -> ``InstanceNormalization`` ->
``Reshape`` back, which OpenVINO reads as Reshape -> MVN -> Reshape. The CPU plugin runs its convolutions
channels-last (``acdb``), but a Reshape that folds channels into the spatial axes needs the planar layout, so
every GroupNorm costs two full-tensor reorders: the convolution's output to planar before it, and the
activation (in int8, the quantized activation) back to channels-last after it. In the SD1.5 VAE decoder at
512x512, Reorder ops were 0.403 s of the 2.425 s its int8 ops took (``python -m latentrt.bench.opprofile``,
benchmarks/RESULTS.md, "Full int8 on AVX512-VNNI"); listing them in the compiled model put 0.35 s of that
around the GroupNorms (section "GroupNorm without reorders"). OpenVINO's own ``GroupNormalization`` op is
decomposed into the same Reshape -> MVN on this plugin.

:func:`rewrite_group_norms` replaces each such pattern with operations that keep the 4-D tensor whole, so
the plugin keeps it channels-last:

- ``m_c = ReduceMean(x, [2, 3])`` and ``v_c = ReduceMean((x - m_c)**2, [2, 3])``, per channel;
- per group (K = C / G channels of equal size): ``m_g = mean_K(m_c)``,
  ``v_g = mean_K(v_c) + mean_K((m_c - m_g)**2)`` (the law of total variance: exactly MVN's variance);
- ``y = x * scale_c + shift_c`` with ``scale_c = s_g / sqrt(v_g + eps)`` and ``shift_c = b_g - m_g * scale_c``
  broadcast to the group's channels (``s_g``, ``b_g``: the instance norm's own scale and bias).

Two passes for the variance, not ``E[x**2] - E[x]**2``: in bf16 the one-pass form loses everything when a
group's mean is large against its spread (a probe with a mean of 30 and unit spread gave errors in the
thousands; this form matched MVN's error, 0.0176 mean absolute against 0.0175). The per-channel and
per-group tensors are ``[N, C, 1, 1]`` small; what touches the whole tensor is two reductions and one fused
elementwise pass, and no reorder.
"""

from __future__ import annotations

import numpy as np

#: part of the IR cache keys (:func:`latentrt.runtime.engines.openvino._ir_cache`, ``int8_ir``): bump it
#: when the rewrite changes, so that no IR written by another version of it is reused
VERSION = "gn1"


def _constant(value):
    """The values of a Constant, flattened, through Converts and shape-only ops (the ONNX frontend reshapes
    an instance norm's scale and bias to the input's rank with a shape computed at run time), or None."""
    node = value.get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Unsqueeze", "Squeeze"):
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data(), dtype=np.float32).reshape(-1)


def _same(a, b) -> bool:
    return a.get_instance_id() == b.get_instance_id()


def _is(dim, n: int) -> bool:
    """Whether a Dimension can be ``n`` (dynamic, or static and equal)."""
    return dim.is_dynamic or dim.get_length() == n


def _only_consumer(value):
    """The one consumer of ``value`` besides ShapeOf ops (which only read its shape), or None."""
    targets = [t.get_node() for t in value.get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
    return targets[0] if len(targets) == 1 else None


def _group_affine(node, groups: int, prev):
    """The instance norm's per-group scale or bias as [G] where ``node`` (Multiply or Add) applies a constant
    of shape [G], [1, G, 1] or a scalar to ``prev``'s output, else None."""
    for mine, other in ((1, 0), (0, 1)):
        if not _same(node.input_value(other).get_node(), prev):
            continue
        c = _constant(node.input_value(mine))
        if c is None:
            continue
        shape = node.input_value(mine).get_partial_shape()
        if c.size == 1:
            return np.full(groups, float(c[0]), np.float32)
        # G values broadcast against [N, G, HW]: on the group axis (a static shape must say so)
        if c.size == groups and (shape.rank.is_dynamic or shape.rank.get_length() <= 1 or
                                 (shape.rank.get_length() <= 3 and _is(shape[shape.rank.get_length() - 1], 1))):
            return c
    return None


def _groups_per_sample(reshape, xs, groups: int) -> bool:
    """Whether ``reshape`` makes [N, G, -1] of x: a constant target whose batch is 0 (kept, with special_zero)
    or x's own static batch, and whose last axis is -1 or the static rest (not a batch folded elsewhere)."""
    target = reshape.input_value(1).get_node()
    if target.get_type_name() != "Constant":
        return False
    t = [int(v) for v in target.get_data().reshape(-1)]
    if len(t) != 3 or t[1] != groups:
        return False
    keep = reshape.get_attributes().get("special_zero", False)
    batch_ok = (t[0] == 0 and keep) or (xs[0].is_static and t[0] == xs[0].get_length())
    rest = [d.get_length() for d in list(xs)[1:]] if all(d.is_static for d in list(xs)[1:]) else None
    last_ok = t[2] == -1 or (rest is not None and t[2] == int(np.prod(rest)) // groups)
    return batch_ok and last_ok


def _back_to_shape_of(reshape, x) -> bool:
    """Whether ``reshape`` gives back x's own shape: its target is ShapeOf(x), or x's static shape."""
    target = reshape.input_value(1)
    node = target.get_node()
    if node.get_type_name() == "ShapeOf":
        source = node.input_value(0)
        return _same(source.get_node(), x.get_node()) and source.get_index() == x.get_index()
    xs = x.get_partial_shape()
    if node.get_type_name() == "Constant" and xs.is_static:
        return [int(v) for v in node.get_data().reshape(-1)] == [d.get_length() for d in xs]
    return False


def _match(mvn):
    """(x, groups, eps, inside_sqrt, scale [G], bias [G], the Reshape whose output the rewrite replaces)
    for an MVN that is a GroupNorm of an [N, C, ...] tensor (4-D after convolutions; 3-D in the VAE's
    attention) with a static channel count, else None."""
    attrs = mvn.get_attributes()
    if not attrs.get("normalize_variance", False):
        return None
    reshape_in = mvn.input_value(0).get_node()
    if reshape_in.get_type_name() != "Reshape":
        return None
    x = reshape_in.input_value(0)
    xs, gs = x.get_partial_shape(), mvn.get_output_partial_shape(0)
    if xs.rank.is_dynamic or xs.rank.get_length() < 3 or gs.rank.is_dynamic or gs.rank.get_length() != 3:
        return None
    if xs[1].is_dynamic or gs[1].is_dynamic:
        return None
    channels, groups = xs[1].get_length(), gs[1].get_length()
    if groups < 1 or channels % groups:
        return None
    axes = _constant(mvn.input_value(1)) if mvn.get_input_size() > 1 else None
    if axes is None or sorted(int(a) % 3 for a in axes.reshape(-1)) != [2]:
        return None
    if not _groups_per_sample(reshape_in, xs, groups):
        return None
    scale, bias = np.ones(groups, np.float32), np.zeros(groups, np.float32)
    prev, node = mvn, _only_consumer(mvn.output(0))
    if node is not None and node.get_type_name() == "Multiply":
        found = _group_affine(node, groups, prev)
        if found is None:
            return None
        scale, prev, node = found, node, _only_consumer(node.output(0))
    if node is not None and node.get_type_name() == "Add":
        found = _group_affine(node, groups, prev)
        if found is None:
            return None
        bias, prev, node = found, node, _only_consumer(node.output(0))
    if node is None or node.get_type_name() != "Reshape":
        return None
    if not _back_to_shape_of(node, x):
        return None
    return x, groups, float(attrs["eps"]), attrs.get("eps_mode", "INSIDE_SQRT").upper() == "INSIDE_SQRT", scale, bias, node


def _rewrite(ops, x, groups: int, eps: float, inside: bool, g_scale, g_bias):
    """The 4-D GroupNorm of ``x`` (see the module docstring): its output."""
    shape = x.get_partial_shape()
    channels, rank = shape[1].get_length(), shape.rank.get_length()
    k = channels // groups
    f32 = np.float32
    spatial = ops.constant(np.arange(2, rank, dtype=np.int64))
    last = ops.constant(np.array([2], np.int64))
    to_groups = ops.constant(np.array([0, groups, k], np.int64))
    to_channels = ops.constant(np.array([0, channels] + [1] * (rank - 2), np.int64))
    m_c = ops.reduce_mean(x, spatial, True)                                     # [N, C, 1, 1]
    d = ops.subtract(x, m_c)
    v_c = ops.reduce_mean(ops.multiply(d, d), spatial, True)                    # [N, C, 1, 1]
    m_ck = ops.reshape(m_c, to_groups, True)                                    # [N, G, K]
    m_g = ops.reduce_mean(m_ck, last, True)                                     # [N, G, 1]
    dm = ops.subtract(m_ck, m_g)
    v_g = ops.add(ops.reduce_mean(ops.reshape(v_c, to_groups, True), last, True),
                  ops.reduce_mean(ops.multiply(dm, dm), last, True))            # [N, G, 1]
    eps_c = ops.constant(f32(eps))
    if inside:
        inv = ops.divide(ops.constant(f32(1)), ops.sqrt(ops.add(v_g, eps_c)))
    else:
        inv = ops.divide(ops.constant(f32(1)), ops.add(ops.sqrt(v_g), eps_c))
    ones = ops.constant(np.ones((1, groups, k), f32))                           # broadcast per group -> per channel
    scale_g = ops.multiply(inv, ops.constant(g_scale.reshape(1, groups, 1).astype(f32)))
    shift_g = ops.subtract(ops.constant(g_bias.reshape(1, groups, 1).astype(f32)), ops.multiply(m_g, scale_g))
    scale_c = ops.reshape(ops.multiply(scale_g, ones), to_channels, True)       # [N, C, 1, 1]
    shift_c = ops.reshape(ops.multiply(shift_g, ones), to_channels, True)
    return ops.add(ops.multiply(x, scale_c), shift_c).output(0)


def rewrite_group_norms(model) -> int:
    """Rewrite every GroupNorm pattern of ``model`` (an ``openvino.Model``, in place; see the module
    docstring); returns how many. Only float32 graphs are rewritten (what the IR cache converts: fp16
    bundles are first made fp32 compute by :mod:`.openvino_f16`); anything else is left as it is."""
    import openvino.opset13 as ops

    count = 0
    for mvn in [op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]:
        found = _match(mvn)
        if found is None:
            continue
        x, groups, eps, inside, g_scale, g_bias, reshape_out = found
        if x.get_element_type().get_type_name() != "f32":
            continue
        new = _rewrite(ops, x, groups, eps, inside, g_scale, g_bias)
        new.get_node().set_friendly_name(reshape_out.get_friendly_name() + "/groupnorm_nhwc")
        reshape_out.output(0).replace(new)
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count
