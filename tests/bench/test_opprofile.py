"""OpenVINO per-op counters (``profile=True``) and the top-ops summary of ``latentrt.bench.opprofile``."""

from __future__ import annotations

import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")


def test_top_ops_of_unet_and_vae(lcm_bundle):
    import onnx

    from latentrt.bench.opprofile import profile

    out = profile(str(lcm_bundle), height=64, width=64, steps=2, precision="fp32", threads=1, top=4)
    every = profile(str(lcm_bundle), height=64, width=64, steps=2, precision="fp32", threads=1, top=100)
    for c in ("unet", "vae_decoder"):
        top = out[c]["top"]
        assert 1 <= len(top) <= 4 and out[c]["seconds_per_call"] > 0 and out[c]["wall_seconds_per_call"] > 0
        assert [t["seconds_per_call"] for t in top] == sorted((t["seconds_per_call"] for t in top), reverse=True)
        assert 0 < sum(t["share"] for t in top) <= 1.0 + 1e-9
        # the counters are those of the profiled call only (not the warm-up's), per call of the component:
        # each of the graph's convolutions once per call. (Their seconds are not compared with the wall
        # time: OpenVINO's per-op real times add up to more than the call's wall time on a loaded machine,
        # 45 ms of ops in a 32 ms call with two busy processes beside it.)
        graph = onnx.load(str(lcm_bundle / c / "model.onnx"), load_external_data=False).graph
        convs = sum(t["count_per_call"] for t in every[c]["top"] if t["op"] == "Convolution")
        assert convs == sum(n.op_type == "Conv" for n in graph.node) > 0
    assert any(t["op"] == "Convolution" for t in out["vae_decoder"]["top"])


def test_no_counters_without_profile(lcm_bundle):
    import latentrt

    pipe = latentrt.load(lcm_bundle, backend="openvino", precision="fp32")
    assert pipe.engines["unet"].op_times is None


def test_engine_options_reach_the_profiled_pipeline(lcm_bundle, capsys):
    """``--engine-option`` (as ``latentrt generate`` values them) is passed to the profiled load: with
    shapes=static nothing compiles until the warm-up call, and an unknown value is the engine's own error."""
    import json

    from latentrt.bench.opprofile import main, parsed_engine_options, profile_arguments

    args = profile_arguments("x").parse_args([str(lcm_bundle), "--engine-option", "shapes=static",
                                              "--engine-option", "max_shapes=3", "--threads", "1"])
    assert parsed_engine_options(args) == {"shapes": "static", "max_shapes": 3}  # threads travel on their own
    assert main([str(lcm_bundle), "--height", "64", "--width", "64", "--steps", "1", "--precision", "fp32",
                 "--threads", "1", "--top", "2", "--engine-option", "shapes=static"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert set(out) == {"unet", "vae_decoder"} and out["unet"]["seconds_per_call"] > 0
    with pytest.raises(ValueError, match="shapes must be one of"):
        main([str(lcm_bundle), "--precision", "fp32", "--engine-option", "shapes=fixed"])
    # what the tool sets itself is refused, naming the flag to use (not Python's duplicate-keyword TypeError)
    for pair, hint in (("precision=int8", "use --precision"), ("threads=2", "use --threads"),
                       ("profile=false", "always on")):
        with pytest.raises(SystemExit, match=rf"--engine-option {pair.split('=')[0]}: set by this tool itself; .*{hint}"):
            main([str(lcm_bundle), "--engine-option", pair])


def test_cold_start_refuses_its_own_options():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cold_start.py"
    r = subprocess.run([sys.executable, str(script), "no-such-bundle", "--engine-option", "shapes=static"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--engine-option shapes: set by this tool itself; use --shapes" in r.stderr
