"""Precision of exported graphs.

fp16 graphs are traced from a half-precision copy of the torch module, so the ONNX graph carries
exactly the casts diffusers itself makes in fp16 (the sinusoidal timestep embedding is computed in
fp32 and cast, attention and norms follow the model's own upcast settings). Precision therefore
lives in the graph, as strongly typed TensorRT networks require. Inputs listed in
``FP32_INPUTS`` stay float32 whatever the precision (fractional Euler timesteps would round in fp16).

We tried ONNX-level conversion (onnxconverter-common 1.16 ``convert_float_to_float16``) first: on
these graphs (onnx 1.23, opset 17) it leaves inconsistent Cast/Concat types that ONNX Runtime refuses
to load, with or without an op block list.

Why not NVIDIA ModelOpt AutoCast (the tool TensorRT 11's migration guide points to): the wheel
(nvidia-modelopt 0.47) downloads, but its ``[onnx]`` extra pins onnx~=1.21 and onnxruntime-gpu~=1.24
(this project runs onnx 1.23 and onnxruntime 1.32), pulls cupy-cuda12x, and its fp16 conversion is
built on onnxconverter-common 1.16, the converter that produced unloadable graphs here (above). It
is also not needed: AutoCast decides per node, from reference activations, which ops stay in fp32;
tracing the half model gets the same result from the source of truth, since the graph keeps exactly
the fp32 islands the model's authors put in its fp16 code path (timestep/guidance embeddings, the
attention softmax of transformers' text encoders), i.e. the numerics diffusers' own fp16 pipelines
run in production.

Text encoders are traced with transformers' eager attention (:func:`eager_attention`): with its
default SDPA attention and a causal mask, torch's TorchScript exporter builds the mask in fp32 whatever
the query's dtype, so type promotion cast the attention scores, then the residual stream and every
later layer to fp32 (CLIP ViT-bigG: 626M of its 694M parameters ended up fp32 in the "fp16" graph).
Eager attention adds an fp16 mask and runs softmax in fp32, as transformers' own fp16 eager path does. Components that overflow in fp16 (the
SDXL VAE) are kept in fp32 as a whole by the profile (``[precision] vae_decoder = "fp32"``). The
check is numerical: the fp16 LCM bundle's image is within 2e-2 of the fp32 bundle's on ONNX Runtime
CPU, with no NaN/inf (tests/engines/test_mixed_precision.py).
"""

from __future__ import annotations

from contextlib import contextmanager

PRECISIONS = ("fp32", "fp16")
FP32_INPUTS = ("timestep", "time_ids", "freeu")  # time_ids: SDXL sizes such as 4097 are not exact in fp16; freeu: export/freeu.py


def parse_component_precisions(precision: str, overrides: dict[str, str] | None = None) -> dict:
    """``precision`` for every component, with per-component ``overrides`` (e.g. {"vae_decoder": "fp32"})."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    for name, p in (overrides or {}).items():
        if p not in PRECISIONS:
            raise ValueError(f"precision of {name} must be one of {PRECISIONS}; got {p!r}")
    return dict(overrides or {})


@contextmanager
def eager_attention(module):
    """Trace transformers models inside ``module`` with eager attention (restored afterwards): see the
    module docstring for why fp16 text encoders need it. diffusers' own modules are unaffected."""
    switched = []
    for sub in module.modules():
        config = getattr(sub, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if impl is not None and impl != "eager" and all(config is not c for c, _ in switched):
            switched.append((config, impl))
            config._attn_implementation = "eager"
    try:
        yield
    finally:
        for config, impl in switched:
            config._attn_implementation = impl


def harmonize_float_types(model, max_passes: int = 8, base_dir: str | None = None):
    """Make every node's float inputs share one type, as torch's type promotion does.

    torch runs some ops with mixed float inputs (e.g. LayerNorm with fp32 activations and fp16
    weights, which the exporter passes through as they are); ONNX requires one type. Each such input in fp16 is cast up to fp32 (initializers are converted in place when
    nothing else uses them), which keeps those norms in fp32. Repeats until type inference finds
    no mixed node. ``model`` may be loaded without its external weights (``base_dir`` is where they
    are; the few initializers converted here are read from there).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    for _ in range(max_passes):
        inferred = onnx.shape_inference.infer_shapes(model)
        g = inferred.graph
        types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
        inits = {i.name: i for i in model.graph.initializer}
        types.update({n: i.data_type for n, i in inits.items()})
        uses: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                uses[i] = uses.get(i, 0) + 1
        changed = False
        new_nodes = []
        for n in model.graph.node:
            kinds = {types.get(i) for i in n.input if types.get(i) in floats}
            if len(kinds) > 1 and n.op_type not in ("Cast", "Shape", "Reshape", "Expand", "Slice", "Resize"):
                for k, name in enumerate(n.input):
                    if types.get(name) != TensorProto.FLOAT16:
                        continue
                    if name in inits and uses.get(name) == 1:
                        arr = numpy_helper.to_array(inits[name], base_dir=str(base_dir or "")).astype(np.float32)
                        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
                    else:
                        cast_out = f"{name}__to_fp32__{len(new_nodes)}"
                        new_nodes.append(helper.make_node("Cast", [name], [cast_out], to=TensorProto.FLOAT,
                                                          name=f"{n.name}/upcast{k}"))
                        n.input[k] = cast_out
                changed = True
            new_nodes.append(n)
        if not changed:
            return model
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        del model.graph.value_info[:]
    raise RuntimeError("could not make the fp16 graph's types consistent")
