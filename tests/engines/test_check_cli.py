"""`latentrt check`: backends compared component by component; non-zero exit above tolerance."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from latentrt.check import compare_arrays, parse_backends


def _check(bundle, *args):
    return subprocess.run([sys.executable, "-m", "latentrt.cli", "check", str(bundle), *args],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)


def test_check_cpu_backends_pass_and_fail(lcm_bundle):
    ok = _check(lcm_bundle, "--backends", "onnxruntime,torch")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for comp in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert comp in ok.stdout
    assert "PSNR dB" in ok.stdout and "all 6 outputs within tolerance" in ok.stdout


def test_check_exit_code_above_tolerance(lcm_bundle, capsys):
    """In-process (the torch stack is already imported): same code path as the command."""
    from latentrt.cli import main

    rc = main(["check", str(lcm_bundle), "--backends", "onnxruntime:cpu,torch:cpu", "--components", "unet",
               "--tolerance", "0", "--height", "64", "--width", "96", "--batch", "2"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL (> 0)" in out and "1 of 1 outputs are above tolerance" in out


def test_compare_arrays_and_backend_parsing():
    ref = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    max_abs, rel, psnr, finite = compare_arrays(ref, ref + np.float32(0.02))
    assert math.isclose(max_abs, 0.02, rel_tol=1e-5) and math.isclose(rel, 0.01, rel_tol=1e-5) and finite
    assert math.isclose(psnr, 10 * math.log10(4 / 0.0004), rel_tol=1e-4)
    assert compare_arrays(ref, ref)[2] == math.inf
    assert compare_arrays(ref, np.array([0, np.nan, 2]))[3] is False
    assert parse_backends("onnxruntime,torch:cuda") == [("onnxruntime", "cpu"), ("torch", "cuda")]
    with pytest.raises(ValueError, match="at least two backends"):
        parse_backends("onnxruntime")
