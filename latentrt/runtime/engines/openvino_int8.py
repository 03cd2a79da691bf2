"""``precision="int8"`` on the OpenVINO backend: the UNet (and, with ``int8_components``, the VAE
decoder) quantized with NNCF, calibrated through the pipeline itself, stored in the bundle's cache.

How (engine option ``int8_method``):

- ``"full"`` (the default): every convolution and MatMul that NNCF quantizes gets int8 weights *and*
  activations (``nncf.quantize``, transformer model type, SmoothQuant off), calibrated on the inputs that
  the pipeline produces for a few prompts (:func:`calibration_samples`: a bf16 run of this bundle).
- ``"hybrid"``, as optimum-intel does for its diffusion pipelines: MatMuls and embeddings with weights
  (attention projections, feed-forwards, time embedding) get int8 *weights* only (``nncf.compress_weights``,
  asymmetric per channel), computed in bf16; the rest, convolutions first, is quantized as in ``"full"``.

Why "full" is the default: it was the faster method on both CPUs measured. One UNet step at 512x512, 2 threads,
interleaved in one process (``benchmarks/int8_unet_ab.py``): on a 2-core AMD EPYC with AVX512-VNNI and no AMX,
full 0.838 s, hybrid 0.974 s, bf16 1.206 s, fp32 2.260 s, both int8 methods at the same mean output error against
fp32; on a 2-core Intel Xeon with VNNI and no AMX, full (with SmoothQuant) 1.685 s against hybrid's 1.791 s. Through
the pipeline on that EPYC (UNet and VAE decoder int8 full, static shapes, GroupNorms rewritten channels-last,
``benchmarks/scenarios/sd15_lcm_peers_int8_full.toml``), an image took 4.70-5.16 s against the faster OpenVINO peer's
7.58-8.09 s in four runs, at 39.9 dB against diffusers fp32 over 8 prompts (``benchmarks/RESULTS.md``). Whether the images stay close enough to fp32 is for the benchmark's
quality gate to say (``latentrt bench`` with ``quality_samples``), not assumed here.

Which components: ``int8_components`` (default ``("unet",)``; ``("vae_decoder",)`` or both). The others run
in bf16 (on CPUs without bf16, fp32). The quantized IR lives at
``<bundle cache>/openvino/<component>-int8-<key>.xml``, keyed by the component's sha256, the OpenVINO
and NNCF versions, the method, the calibration settings, whether its GroupNorms were rewritten first (static
shapes on the CPU, :mod:`.openvino_groupnorm`; the calibration then sees the rewritten graph) and whether its
convolutions' inputs were made unsigned afterwards (the CPU plugin, :mod:`.openvino_u8conv`: no zero-point
compensation for oneDNN to compute at every blob import); it is made once (minutes for a full-size
UNet) and mapped by every later load. A load that quantizes both components calibrates them one after the other
(its engines are otherwise created in parallel) from one bf16 run of the pipeline that records the inputs of both
(:func:`recorded_inputs`), and frees that pipeline before NNCF runs.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

from ...manifest import write_json_atomic
from .openvino_groupnorm import VERSION as GROUPNORM_VERSION
from .openvino_groupnorm import rewrite_group_norms
from .openvino_u8conv import VERSION as UNSIGNED_VERSION
from .openvino_u8conv import unsigned_conv_inputs

#: the components that can be quantized (engine option ``int8_components``); the others run at the int8
#: precision's compute hint (bf16 where the CPU has it)
QUANTIZABLE = ("unet", "vae_decoder")
#: what ``precision="int8"`` quantizes unless ``int8_components`` says otherwise
DEFAULT_COMPONENTS = ("unet",)


def int8_components(value) -> tuple[str, ...]:
    """The checked ``int8_components`` engine option (None: :data:`DEFAULT_COMPONENTS`)."""
    if value is None:
        return DEFAULT_COMPONENTS
    names = tuple(n.strip() for n in value.split(",")) if isinstance(value, str) else value  # CLI: a,b
    try:
        names = tuple(names)
    except TypeError:
        names = (value,)
    bad = [n for n in names if n not in QUANTIZABLE]
    if bad or not names:
        raise ValueError(f"int8_components must name one or more of {list(QUANTIZABLE)}; got {value!r}")
    return names
#: calibration prompts (a prompt and its seed per calibration image)
PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon, highly detailed",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "a bowl of ramen on a wooden table, studio photo",
    "a futuristic city skyline at night with neon lights",
    "a cat sleeping on a pile of books, soft morning light",
    "an oil painting of a mountain lake surrounded by pine trees",
    "a red vintage car parked on a cobblestone street",
)
DEFAULT_CALIBRATION = {"prompts": 4, "steps": 4, "height": None, "width": None}
#: ``int8_method`` -> the version of it that a cached IR's key names (a change to a method bumps it)
METHODS = {"full": "full-v1", "hybrid": "hybrid-v1"}
DEFAULT_METHOD = "full"


def int8_method(value) -> str:
    """The checked ``int8_method`` engine option (None: :data:`DEFAULT_METHOD`)."""
    if value is None:
        return DEFAULT_METHOD
    if value not in METHODS:
        raise ValueError(f"int8_method must be one of {list(METHODS)}; got {value!r}")
    return value


def _missing_nncf(reason) -> ImportError:
    return ImportError(f"precision='int8' on the openvino backend needs NNCF ({reason}); install it with "
                       "`pip install 'latentrt[cpu-fast]'` (or `pip install nncf`)")


def _import_nncf():
    try:
        import nncf
    except ImportError as e:
        raise _missing_nncf(e) from None
    return nncf


def _nncf_version() -> str:
    """NNCF's version, without importing it (``import nncf`` takes about 2.5 s; a cached IR needs no NNCF)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nncf")
    except PackageNotFoundError:
        raise _missing_nncf("No module named 'nncf'") from None


def calibration_settings(bundle, options: dict | None) -> dict:
    """The calibration of a bundle: ``options`` over :data:`DEFAULT_CALIBRATION`, size from the bundle."""
    unknown = sorted(set(options or {}) - set(DEFAULT_CALIBRATION))
    if unknown:
        raise ValueError(f"int8_calibration: unknown keys {unknown}; known: {sorted(DEFAULT_CALIBRATION)}")
    cal = {**DEFAULT_CALIBRATION, **(options or {})}
    c = bundle.constants
    cal["height"] = int(cal["height"] or c.get("default_height") or 512)
    cal["width"] = int(cal["width"] or c.get("default_width") or 512)
    if not 1 <= int(cal["prompts"]) <= len(PROMPTS):
        raise ValueError(f"int8_calibration: prompts must be 1..{len(PROMPTS)}; got {cal['prompts']!r}")
    return cal


def recorded_inputs(bundle, components, cal: dict, threads) -> dict[str, list[dict]]:
    """The inputs of each of ``components`` over one bf16 run of the bundle's own pipeline on the calibration
    prompts (one seed each): what the quantized models will see. The pipeline is gone when this returns."""
    import numpy as np

    from ..loader import load

    pipe = load(bundle.path, backend="openvino", precision="auto", threads=threads)
    samples: dict[str, list[dict]] = {c: [] for c in components}
    runs = {c: pipe.engines[c].run for c in components}

    def recorder(component):
        def recording(arrays):
            samples[component].append({k: np.array(v, copy=True) for k, v in arrays.items()})
            return runs[component](arrays)
        return recording

    try:
        for c in components:
            pipe.engines[c].run = recorder(c)
        # the UNet's inputs are all seen before decoding; the VAE decoder's need the decode itself
        output_type = "np" if "vae_decoder" in components else "latent"
        for i, prompt in enumerate(PROMPTS[: int(cal["prompts"])]):
            pipe(prompt, height=cal["height"], width=cal["width"], num_inference_steps=int(cal["steps"]),
                 generator=i, output_type=output_type)
    finally:  # the recorders hold their engines: without this the compiled pipeline outlives the call
        for c in components:
            pipe.engines[c].__dict__.pop("run", None)
        del pipe, runs
        gc.collect()
    return samples


def calibration_samples(bundle, component: str, cal: dict, threads) -> list[dict]:
    """The inputs of ``component`` over a bf16 run of the bundle's own pipeline (:func:`recorded_inputs`)."""
    return recorded_inputs(bundle, (component,), cal, threads)[component]


#: one calibration at a time in a process. A load creates its engines in parallel threads, and each
#: calibration holds a bf16 pipeline and then NNCF's statistics model of the f32 graph: two at once (UNet
#: and VAE decoder) peaked at 10.7 GB on SD1.5, against 3.4 GB for the pipeline that runs afterwards
_calibrating = threading.Lock()
#: inputs recorded for components whose int8 IR is still to be made, by (bundle, calibration, threads):
#: one pipeline run serves every component of ``int8_components`` (the same prompts, seeds and steps)
_pending: dict[tuple, dict[str, list[dict]]] = {}


def _samples(bundle, name: str, cal: dict, threads, components) -> list[dict]:
    """``name``'s calibration inputs: recorded before for it by another component's calibration, else recorded
    now together with those of the other ``components`` (kept in :data:`_pending` until they are taken)."""
    key = (str(bundle.path), json.dumps(cal, sort_keys=True), threads)
    waiting = _pending.get(key, {})
    if name in waiting:
        samples = waiting.pop(name)
        if not waiting:
            _pending.pop(key, None)
        return samples
    others = tuple(c for c in dict.fromkeys(components or ()) if c != name and c in QUANTIZABLE)
    recorded = recorded_inputs(bundle, (name, *others), cal, threads)
    if others:
        _pending[key] = {c: recorded[c] for c in others}
    return recorded[name]


def _weighted_matmuls(model) -> list[str]:
    """Friendly names of the MatMuls with a constant (weight) input, through decompression Converts."""

    def constant(value) -> bool:
        node = value.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
            and any(constant(op.input_value(i)) for i in range(2))]


def quantize(model, samples: list[dict], method: str = DEFAULT_METHOD):
    """The int8 model (``method``: see the module docstring) of an fp32-compute OpenVINO model."""
    nncf = _import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    ignored = None
    if int8_method(method) == "hybrid":
        matmuls = _weighted_matmuls(model)
        has_conv = any(op.get_type_name() == "Convolution" for op in model.get_ops())
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]) if has_conv else None)
        ignored = nncf.IgnoredScope(names=matmuls, validate=False)
    return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
                         ignored_scope=ignored,
                         advanced_parameters=AdvancedQuantizationParameters(
                             smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)))


def int8_ir(ov, core, name: str, onnx_path: Path, cache_dir: Path, model_sha: str, bundle, cal_options,
            threads, progress=None, method: str = DEFAULT_METHOD, groupnorm: bool = False,
            unsigned: bool = False, components=()) -> Path:
    """The int8 IR of component ``name`` (``method``), calibrated and saved once (see the module docstring).
    A cached IR is found without importing NNCF (its version is read from the package's metadata). With
    ``groupnorm``, GroupNorms are rewritten channels-last before quantizing (:mod:`.openvino_groupnorm`); with
    ``unsigned``, the quantized convolutions' inputs are made unsigned after it (:mod:`.openvino_u8conv`).
    ``components``: every component this load quantizes; one calibration run records all their inputs."""
    nncf_version = _nncf_version()
    if bundle is None:
        raise ValueError(f"{name}: precision='int8' calibrates through the bundle's pipeline; load it with "
                         "latentrt.load(bundle, backend='openvino', precision='int8')")
    cal = calibration_settings(bundle, cal_options)
    method = int8_method(method)
    parts = [model_sha or str(onnx_path), ov.__version__, nncf_version, METHODS[method], cal]
    if groupnorm:
        parts.append(GROUPNORM_VERSION)
    if unsigned:
        parts.append(UNSIGNED_VERSION)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / "openvino"
    xml = folder / f"{name}-int8-{key}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    from .openvino_f16 import as_f32_with_f16_weights, is_f16_graph

    with _calibrating:
        if xml.is_file() and xml.with_suffix(".bin").is_file():  # made by another thread meanwhile
            return xml
        if progress:
            progress(f"{name}: calibrating int8 ({method}) on {cal['prompts']} prompts at {cal['height']}x{cal['width']} (once)")
        samples = _samples(bundle, name, cal, threads, components)
        model = core.read_model(str(onnx_path))
        if is_f16_graph(model):
            model, _ = as_f32_with_f16_weights(model)
        if groupnorm:
            rewrite_group_norms(model)
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the caller's (JSON, images)
            model = quantize(model, samples, method)
        rewritten = unsigned_conv_inputs(model) if unsigned else 0
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{xml.stem}.{os.getpid()}.tmp.xml"
        try:
            ov.save_model(model, str(tmp), compress_to_fp16=True)
            os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(tmp, xml)
        finally:
            for t in (tmp, tmp.with_suffix(".bin")):
                t.unlink(missing_ok=True)
        write_json_atomic(folder / f"{xml.stem}.json", {"calibration": cal, "samples": len(samples),
                                                         "method": METHODS[method], "nncf": nncf_version,
                                                         "groupnorm": groupnorm, "unsigned_convolutions": rewritten})
    return xml
