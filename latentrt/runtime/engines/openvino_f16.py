"""fp16 bundles on OpenVINO's CPU plugin: the fp16 graph rewritten as fp32 compute over fp16-stored weights.

Why: compiling a genuine fp16 graph for a bf16 (or f32) inference precision makes the CPU plugin
convert every weight at compile time and keep about three times the fp16 weights resident. The
full-size SDXL UNet (5.1 GB of fp16 weights) measured 15.2 GB RSS right after ``compile_model``
(23 s) with OpenVINO 2026.4, and the whole SDXL pipeline did not fit in 24 GiB. Weights stored the
way OpenVINO stores them for fp32 models saved with ``compress_to_fp16`` (an fp16 Constant feeding
a Convert to f32 marked as *decompression*) are instead repacked lazily to the inference precision:
the same UNet compiles in 7.8 s to 0.5 GB and runs a 1024x1024 step at 11.1 GB RSS, of which 5.1 GB
are file-backed pages of the memory-mapped IR (RssFile; probe scripts that compile the UNet IR alone,
see benchmarks/RESULTS.md, SDXL section).

So before an fp16 graph is saved as IR (:func:`latentrt.runtime.engines.openvino._ir_cache`):

- every fp16 Constant gets a Convert to f32 after it, named with :data:`MARK`;
- every Convert to fp16 (the graph's own casts) becomes a Convert to f32;
- fp16 inputs become f32 inside the model, while PrePostProcessor keeps the model's *tensors* fp16 at
  its inputs and outputs, so the engine's I/O still matches the manifest;
- after saving, :func:`mark_decompression` adds the ``decompression`` attribute to the marked
  Converts in the IR XML: OpenVINO's Python API cannot set that attribute (its rt_info value is a
  C++ class), but its IR reader creates it from the XML, exactly as in IR that OpenVINO writes.

Numerics: the compute precision is the inference precision (bf16) either way; only the weights'
storage and conversion time change.
"""

from __future__ import annotations

import re
from pathlib import Path

#: suffix of the friendly names of the Converts that decompress fp16 weights
MARK = "__latentrt_f16_weights"
_MARKED = re.compile(r'(<layer id="\d+" name="[^"]*' + re.escape(MARK) +
                     r'" type="Convert" version="opset1">\s*<data destination_type="f32" />)')
_RT_INFO = '\\1\n\t\t\t<rt_info>\n\t\t\t\t<attribute name="decompression" version="0" />\n\t\t\t</rt_info>'


def is_f16_graph(model) -> bool:
    """Whether the model computes in fp16 (fp16 inputs or fp16 weights), as fp16 bundles' graphs do."""
    import openvino as ov

    f16 = ov.Type.f16
    return any(p.get_element_type() == f16 for p in model.get_parameters()) or any(
        op.get_type_name() == "Constant" and op.get_element_type() == f16 for op in model.get_ordered_ops())


def as_f32_with_f16_weights(model):
    """Rewrite an fp16 graph in place as fp32 compute over fp16 weights (see the module docstring);
    returns the model (with fp16 I/O tensors kept) and the number of weights converted."""
    import openvino as ov
    from openvino import opset13 as ops
    from openvino.preprocess import PrePostProcessor

    f16, f32 = ov.Type.f16, ov.Type.f32
    f16_inputs = [i for i, p in enumerate(model.get_parameters()) if p.get_element_type() == f16]
    f16_outputs = [i for i, o in enumerate(model.outputs) if o.get_element_type() == f16]
    weights = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Constant" and op.get_element_type() == f16:
            source, name = op, op.get_friendly_name() + MARK
            weights += 1
        elif kind == "Convert" and op.get_output_element_type(0) == f16:
            source, name = op.input_value(0), op.get_friendly_name()
        else:
            if kind == "Parameter" and op.get_element_type() == f16:
                op.set_element_type(f32)
            continue
        targets = list(op.output(0).get_target_inputs())  # before the new Convert becomes one of them
        convert = ops.convert(source, f32)
        convert.set_friendly_name(name)
        for target in targets:
            target.replace_source_output(convert.output(0))
    model.validate_nodes_and_infer_types()
    ppp = PrePostProcessor(model)
    for i in f16_inputs:
        ppp.input(i).tensor().set_element_type(f16)
    for i in f16_outputs:
        ppp.output(i).tensor().set_element_type(f16)
    return ppp.build(), weights


def mark_decompression(xml: Path) -> int:
    """Give the Converts made by :func:`as_f32_with_f16_weights` the ``decompression`` attribute in
    a saved IR; returns how many were marked."""
    text = Path(xml).read_text()
    text, count = _MARKED.subn(_RT_INFO, text)
    Path(xml).write_text(text)
    return count
