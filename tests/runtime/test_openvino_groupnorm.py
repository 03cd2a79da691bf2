"""GroupNorm kept channels-last on OpenVINO's CPU plugin (:mod:`latentrt.runtime.engines.openvino_groupnorm`):
the rewritten graph computes what torch's GroupNorm does, robustly for groups whose mean dwarfs their spread,
leaves other normalizations alone, and takes the reorders out of the compiled model."""

from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")
torch = pytest.importorskip("torch")

import latentrt  # noqa: E402
from latentrt.runtime.bundle import Bundle  # noqa: E402
from latentrt.runtime.engines.openvino_groupnorm import rewrite_group_norms  # noqa: E402


class ConvNorm(torch.nn.Module):
    """conv -> GroupNorm -> SiLU -> conv, as in a ResNet block; and the VAE attention's 3-D GroupNorm."""

    def __init__(self, channels=32, groups=8, affine=True, eps=1e-6, attention=False, in_channels=4, out_channels=4):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm = torch.nn.GroupNorm(groups, channels, eps=eps, affine=affine)
        self.conv2 = torch.nn.Conv2d(channels, out_channels, 3, padding=1)
        self.attention = attention
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.conv1(x)
        if self.attention:  # diffusers' Attention: group_norm on [N, C, H*W]
            n, c, hh, ww = h.shape
            h = self.norm(h.view(n, c, hh * ww)).view(n, c, hh, ww)
        else:
            h = self.norm(h)
        return self.conv2(torch.nn.functional.silu(h))


class LayerNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x)


def _export(module, example, path, dynamic_batch=True):
    torch.manual_seed(0)
    axes = {"x": {0: "B", 2: "H", 3: "W"}} if example.ndim == 4 else {"x": {0: "B"}}
    torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes=axes if dynamic_batch else None, opset_version=17, dynamo=False)
    return str(path)


def _run(model, x, hint="f32"):
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 1})
    return compiled({"x": x})[0], compiled


def _mvns(model) -> int:
    return sum(op.get_type_name() == "MVN" for op in model.get_ordered_ops())


@pytest.mark.parametrize("attention, affine, eps", [(False, True, 1e-6), (False, False, 1e-5), (True, True, 1e-6)])
def test_rewrite_matches_torch(tmp_path, attention, affine, eps):
    torch.manual_seed(0)
    module = ConvNorm(affine=affine, eps=eps, attention=attention)
    x = np.random.default_rng(0).standard_normal((2, 4, 12, 10)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    model = ov.Core().read_model(_export(module, torch.from_numpy(x), tmp_path / "m.onnx"))
    assert _mvns(model) == 1
    assert rewrite_group_norms(model) == 1
    assert _mvns(model) == 0, "the GroupNorm's MVN is still in the graph"
    got, _ = _run(model, x)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    # dynamic batch and spatial size survive the rewrite
    x2 = np.random.default_rng(1).standard_normal((1, 4, 8, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, x2)[0], module(torch.from_numpy(x2)).numpy(), atol=2e-5, rtol=1e-4)


def test_a_mean_far_above_the_spread_stays_exact(tmp_path):
    """Groups with a mean of 1000 and unit spread: the one-pass E[x^2] - E[x]^2 would lose the variance to
    float32 rounding (1e6 + 1 - 1e6); the two-pass statistics keep it (the same output as torch)."""
    torch.manual_seed(0)
    module = ConvNorm()
    with torch.no_grad():
        module.conv1.bias.fill_(1000.0)
    x = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    model = ov.Core().read_model(_export(module, torch.from_numpy(x), tmp_path / "m.onnx"))
    assert rewrite_group_norms(model) == 1
    got, _ = _run(model, x)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)


def test_other_normalizations_are_left_alone(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    model = ov.Core().read_model(_export(LayerNorm(), torch.from_numpy(x), tmp_path / "ln.onnx"))
    before = _mvns(model)
    assert before == 1
    assert rewrite_group_norms(model) == 0
    assert _mvns(model) == before


def _hand_built(target, shape=(2, 8, 3, 5), out_shape=None, eps=1e-5, mode="inside_sqrt"):
    """x (``shape``, -1 for a dynamic axis) -> Reshape(target) -> MVN(axis 2) -> Reshape(out_shape, else ShapeOf(x)),
    built with OpenVINO's opset."""
    import openvino.opset13 as ops

    x = ops.parameter(list(shape), np.float32, name="x")
    r = ops.reshape(x, ops.constant(np.array(target, np.int64)), True)
    m = ops.mvn(r, ops.constant(np.array([2], np.int64)), True, eps, mode)
    back = ops.constant(np.array(out_shape, np.int64)) if out_shape is not None else ops.shape_of(x)
    return ov.Model([ops.reshape(m, back, False)], [x])


def test_only_per_sample_groups_are_rewritten():
    """[0, G, -1] (and the static [N, G, -1]) is a GroupNorm; [1, G, -1] with a batch of 2 folds the batch into the
    normalized axis, and a result reshaped to another shape is not x's: both are left alone. The rewritten ones compute
    what the original computes."""
    x = np.random.default_rng(0).standard_normal((2, 8, 3, 5)).astype(np.float32) * 3 + 1
    for target, out_shape, rewritten in (([0, 4, -1], None, 1), ([2, 4, 30], None, 1), ([1, 4, -1], [2, 8, 3, 5], 0),
                                         ([0, 4, -1], [2, 8, 5, 3], 0)):
        model = _hand_built(target, out_shape=out_shape)
        expected = _run(model, x)[0]
        assert rewrite_group_norms(model) == rewritten, (target, out_shape)
        np.testing.assert_allclose(_run(model, x)[0], expected, atol=1e-5, rtol=1e-5)


def test_any_group_norm_shape_matches_the_plain_graph():
    """Property test (hypothesis): for any batch, channel count, group count dividing it, spatial size, rank (3 or 4),
    eps mode and offset of the data, the rewritten graph computes what the plain Reshape -> MVN graph computes."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        groups = draw(st.integers(1, 4))
        channels = groups * draw(st.integers(1, 4))
        spatial = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
        return (draw(st.integers(1, 2)), channels, groups, spatial, draw(st.sampled_from(["inside_sqrt", "outside_sqrt"])),
                draw(st.floats(1e-6, 1e-2)), draw(st.floats(-50, 50)), draw(st.integers(0, 2**16)))

    @settings(max_examples=25, derandomize=True, database=None, deadline=None)
    @given(cases())
    def check(case):
        batch, channels, groups, spatial, mode, eps, offset, seed = case
        model = _hand_built([0, groups, -1], shape=(-1, channels, *([-1] * len(spatial))), eps=eps, mode=mode)
        data = (np.random.default_rng(seed).standard_normal((batch, channels, *spatial)) + offset).astype(np.float32)
        expected = _run(model, data)[0]
        assert rewrite_group_norms(model) == 1
        np.testing.assert_allclose(_run(model, data)[0], expected, atol=2e-4, rtol=1e-4)

    check()


@pytest.mark.parametrize("hint", ["f32", "bf16"])
def test_the_cpu_plugin_runs_it_without_reorders(tmp_path, hint):
    """Why the rewrite exists: the CPU plugin's convolutions are channels-last, and the Reshape -> MVN GroupNorm
    needs the planar layout, so a static-shape model converts the whole tensor before and after every GroupNorm
    (4 full-size reorders here: the model's input and output, and the two around the GroupNorm); rewritten,
    only the input's and the output's remain."""
    if hint == "bf16" and "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16")
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((1, 64, 32, 32)).astype(np.float32)
    block = ConvNorm(channels=64, groups=16, in_channels=64, out_channels=64)  # a ResNet block's first half
    path = _export(block, torch.from_numpy(x), tmp_path / "m.onnx")

    def full_size_reorders(rewrite: bool) -> int:
        model = ov.Core().read_model(path)
        if rewrite:
            assert rewrite_group_norms(model) == 1
        model.reshape({"x": list(x.shape)})
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 1})
        return sum(op.get_rt_info()["layerType"].astype(str) == "Reorder" and list(op.get_output_shape(0)) == list(x.shape)
                   for op in compiled.get_runtime_model().get_ordered_ops())

    assert full_size_reorders(False) == 4
    assert full_size_reorders(True) == 2, "the rewritten GroupNorm still makes the CPU plugin reorder the tensor"


def test_bundle_ir_is_rewritten_for_static_shapes_on_cpu(lcm_bundle):
    """A static-shape engine's cached IR (CPU) has no GroupNorm MVN left, and its images are the unrewritten
    model's to float32 rounding; a dynamic-shape engine keeps the plain IR (the rewrite measured slower there)."""
    bundle = Bundle(lcm_bundle)
    static = bundle.engine("vae_decoder", "openvino", precision="fp32", shapes="static")
    dynamic = bundle.engine("vae_decoder", "openvino", precision="fp32")
    assert static.cache_path is not None and dynamic.cache_path is not None
    assert static.cache_path != dynamic.cache_path
    onnx_mvns = _mvns(ov.Core().read_model(str(bundle.file(bundle.manifest.components["vae_decoder"].path))))
    assert onnx_mvns > 0
    assert _mvns(ov.Core().read_model(str(static.cache_path))) == 0
    assert _mvns(ov.Core().read_model(str(dynamic.cache_path))) == onnx_mvns
    call = dict(prompt="a lighthouse", num_inference_steps=2, height=64, width=64, output_type="np", generator=5)
    rewritten = latentrt.load(lcm_bundle, backend="openvino", precision="fp32", shapes="static")(**call).images
    plain = latentrt.load(lcm_bundle, backend="openvino", precision="fp32", shapes="static", cache=False)(**call).images
    assert float(np.abs(rewritten - plain).max()) <= 2e-5
