"""The op-by-op floor report (``python -m latentrt.bench.opfloor``): FLOPs counted by forward hooks equal
the analytic counts, OpenVINO op types map to their FLOP categories, and the table's rates and floor
times follow from the counters and the GEMM rate."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'latentrt[cpu-fast]')")


def test_hooks_count_convolutions_linears_and_the_attention_core():
    import torch
    from diffusers.models.attention_processor import Attention

    from latentrt.bench.opfloor import count_flops

    conv3, conv1, lin = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 6, 1), torch.nn.Linear(6, 10)
    attn = Attention(query_dim=10, cross_attention_dim=12, heads=2, dim_head=5)
    x = torch.zeros(2, 4, 5, 7)
    ctx = torch.zeros(2, 3, 12)

    def run():
        y = conv1(conv3(x)).flatten(2).transpose(1, 2)  # (2, 35, 6)
        attn(lin(y), encoder_hidden_states=ctx)

    model = torch.nn.ModuleList([conv3, conv1, lin, attn])
    f = count_flops(model, run)
    assert f["conv3x3"] == 2 * (2 * 8 * 5 * 7) * 4 * 9
    assert f["conv1x1"] == 2 * (2 * 6 * 5 * 7) * 8
    # the Linear plus the attention's own projections (q: 10->10, k, v: 12->10, out: 10->10)
    assert f["linear"] == 2 * (2 * 35) * (6 * 10 + 10 * 10 + 10 * 10) + 2 * (2 * 3) * (12 * 10) * 2
    assert f["attention"] == 4 * 2 * 35 * 3 * 10  # Q K^T and weights x V over 2 heads of 5


def test_op_types_map_to_categories_and_the_table_adds_up():
    from latentrt.bench.opfloor import category, floor_table

    assert category("Convolution", "brgconv_avx512_1x1_bf16") == "conv1x1"
    assert category("Convolution", "brgconv_avx512_bf16") == "conv3x3"
    assert category("FullyConnected", "brgemm_avx512_bf16") == "linear"
    assert category("Subgraph", "jit_avx512_bf16") == "attention"
    assert category("Reorder", "jit_uni_bf16") is None
    prof = {"unet": {"seconds_per_call": 2.0, "wall_seconds_per_call": 2.1, "top": [
        {"op": "Convolution", "kernel": "brgconv_avx512_bf16", "seconds_per_call": 1.0},
        {"op": "FullyConnected", "kernel": "brgemm_avx512_bf16", "seconds_per_call": 0.5},
        {"op": "Reorder", "kernel": "jit_uni_bf16", "seconds_per_call": 0.5}]}}
    flops = {"unet": {"conv3x3": 400e9, "conv1x1": 0, "linear": 100e9, "attention": 0}}
    t = floor_table(prof, flops, peak_gflops=800.0)["unet"]
    rows = {r["category"]: r for r in t["rows"]}
    assert rows["conv3x3"]["gflops"] == pytest.approx(400.0) and rows["conv3x3"]["percent_of_floor_rate"] == pytest.approx(50.0)
    assert rows["linear"]["gflops"] == pytest.approx(200.0) and rows["linear"]["share"] == pytest.approx(0.25)
    assert rows["attention"]["gflops"] is None and t["other_seconds_per_call"] == pytest.approx(0.5)
    assert t["floor_seconds"] == pytest.approx(500 / 800)


def test_the_cli_reports_both_components(lcm_bundle, capsys):
    from latentrt.bench.opfloor import main

    assert main([str(lcm_bundle), "--height", "64", "--width", "64", "--steps", "2", "--threads", "1",
                 "--precision", "fp32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["openvino_gemm_gflops"] > 0
    for comp in ("unet", "vae_decoder"):
        rows = {r["category"]: r for r in out["components"][comp]["rows"]}
        assert rows["conv3x3"]["gflop"] > 0 and rows["conv3x3"]["seconds_per_call"] > 0
    assert {r["category"]: r for r in out["components"]["unet"]["rows"]}["attention"]["gflop"] > 0


def test_the_int8_floor_is_an_int8_gemm():
    """--precision int8: the floor's rate is OpenVINO's int8 FullyConnected, measured on its own time (the probe
    raises when the plugin runs the quantized MatMul any other way, rather than report a float rate as int8's)."""
    from latentrt.bench.opfloor import openvino_gemm_gflops

    assert openvino_gemm_gflops("int8", 1, size=512, seconds=0.1) > 0
