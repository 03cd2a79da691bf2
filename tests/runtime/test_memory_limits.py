"""Memory limits: a call that cannot fit fails at once with latentrt's message, never the engine's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import latentrt
from latentrt.manifest import MANIFEST_NAME
from latentrt.runtime import limits
from latentrt.runtime.engines.base import EngineCallError
from latentrt.runtime.limits import MemoryLimitError

ENGINE_WORDS = ("ONNXRuntimeError", "onnxruntime", "BFCArena", "Failed to allocate", "Traceback")


@pytest.fixture(scope="module")
def unbounded_bundle(lcm_bundle, tmp_path_factory):
    """The tiny bundle with its recorded size range (latentrt.sizes: 16-256 px, 16 images, which refuses
    these calls first) lifted, so that the memory limits are what refuses them."""
    dst = tmp_path_factory.mktemp("memory") / "unbounded"
    shutil.copytree(lcm_bundle, dst, ignore=shutil.ignore_patterns(".cache"))
    data = json.loads((dst / MANIFEST_NAME).read_text())
    data["constants"].update(max_size=1 << 16, max_batch=1 << 20)
    (dst / MANIFEST_NAME).write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def pipe(unbounded_bundle):
    return latentrt.load(unbounded_bundle)


def test_4096_fails_at_once_with_latentrt_message(pipe):
    t0 = time.perf_counter()
    with pytest.raises(MemoryLimitError) as info:
        pipe("a cat", height=4096, width=4096, num_inference_steps=1)
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    assert msg.startswith("unet: this call (B=1, H=4096, W=4096) needs about 4.0 TiB (mostly attention scores of "
                          "8 head(s) over 262144 tokens)"), msg
    assert "is available" in msg and "the largest square size that fits at this batch is" in msg
    assert "unet" not in pipe.last_timings  # the UNet never ran


def test_many_images_fail_at_once(pipe, monkeypatch):
    monkeypatch.setenv(limits.ENV_LIMIT, "1G")
    t0 = time.perf_counter()
    with pytest.raises(MemoryLimitError, match=r"unet: this call \(B=10000, H=64, W=64\) .*only 1\.0 GiB is "
                                               r"available \(\$LATENTRT_MEMORY_LIMIT\).*a batch of at most \d+ fits"):
        pipe("a cat", num_images_per_prompt=10000, num_inference_steps=1)
    assert time.perf_counter() - t0 < 2.0


def test_the_largest_size_named_fits_and_runs(pipe, monkeypatch):
    monkeypatch.setenv(limits.ENV_LIMIT, "200M")
    with pytest.raises(MemoryLimitError, match=r"largest square size that fits at this batch is (\d+)x\1") as info:
        pipe("a cat", height=1024, width=1024, num_inference_steps=1, output_type="latent")
    side = int(str(info.value).split("fits at this batch is ")[1].split("x")[0])
    assert 64 <= side < 1024 and side % 8 == 0
    out = pipe("a cat", height=side, width=side, num_inference_steps=1, output_type="np")
    assert out.images.shape == (1, side, side, 3)
    with pytest.raises(MemoryLimitError):  # one step larger does not fit
        pipe("a cat", height=side + 8, width=side + 8, num_inference_steps=1, output_type="np")


def test_bundles_without_a_memory_record_get_sd15_levels(unbounded_bundle, tmp_path):
    dst = tmp_path / "old"
    shutil.copytree(unbounded_bundle, dst, ignore=shutil.ignore_patterns(".cache"))
    data = json.loads((dst / MANIFEST_NAME).read_text())
    for c in data["components"].values():
        c.get("extra", {}).pop("memory", None)
    (dst / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(MemoryLimitError, match=r"unet: .*attention scores of 8 head\(s\) over 262144 tokens"):
        latentrt.load(dst)("a cat", height=4096, width=4096, num_inference_steps=1)


def test_export_records_the_levels(lcm_bundle):
    m = latentrt.load(lcm_bundle).bundle.manifest
    # the tiny UNet: block_out_channels (32, 64), attention (8 heads) in its first down block only
    assert m.components["unet"].extra["memory"] == {"input": "sample", "levels": [[1.0, 32, 8], [0.5, 64, 0]]}
    assert m.components["vae_decoder"].extra["memory"]["input"] == "latent_sample"
    assert "memory" not in m.components["text_encoder"].extra


_MEASURE = """
import re, sys, latentrt
from latentrt.runtime import limits

def peak():  # VmHWM: this process's own peak RSS (ru_maxrss keeps the forking parent's across exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

pipe = latentrt.load(sys.argv[1])
pipe("a", num_inference_steps=1, output_type="latent", height=64, width=64)
base = peak()
e = pipe.engines["unet"]
est = limits.estimate(e.inputs, e.outputs, limits.memory_record("unet", pipe.bundle.manifest.components["unet"]),
                      {"B": 1, "H": 384, "W": 384})[0]
pipe("a", num_inference_steps=1, output_type="latent", height=384, width=384)
print(est, peak() - base)
"""


def test_estimate_is_close_to_the_measured_peak(unbounded_bundle):
    """The UNet estimate against the peak RSS growth of a real call (tiny UNet, 384x384: 2304 tokens)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(unbounded_bundle)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                         timeout=120, check=True).stdout.split()
    estimate, measured = map(int, out[-2:])
    assert 0.5 < estimate / measured < 2.0, (estimate, measured)


def _limited(limit_bytes: int):
    def preexec():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return preexec


@pytest.mark.parametrize("extra", [["--height", "4096", "--width", "4096"], ["--num-images", "10000"]])
def test_under_an_address_space_limit_no_engine_message_leaks(unbounded_bundle, tmp_path, extra):
    """The CLI in a subprocess under RLIMIT_AS: latentrt's own one-line message, no engine message."""
    env = {**os.environ, "LATENTRT_CACHE": str(tmp_path / "cache")}
    env.pop(limits.ENV_LIMIT, None)
    r = subprocess.run([sys.executable, "-m", "latentrt.cli", "generate", str(unbounded_bundle), "a cat", "--steps", "1",
                        "--no-progress", "-o", str(tmp_path / "out"), *extra],
                       capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120, preexec_fn=_limited(3 << 30), env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: unet: this call"), r.stderr
    assert "address-space limit (RLIMIT_AS)" in r.stderr or "MemAvailable" in r.stderr
    assert not any(w in r.stderr for w in ENGINE_WORDS), r.stderr
    assert not (tmp_path / "out").exists()


def test_available_memory_sees_rlimit_and_env():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
            "from latentrt.runtime.limits import available_memory; print(*available_memory(), sep='|')")
    env = {k: v for k, v in os.environ.items() if k != limits.ENV_LIMIT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=60,
                         check=True).stdout.strip()
    n, source = out.split("|")
    assert source == "the address-space limit (RLIMIT_AS)" and 0 < int(n) < 3 << 30
    assert limits.parse_bytes("1.5G") == 3 << 29 and limits.parse_bytes("512MiB") == 512 << 20
    assert limits.parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="LATENTRT_MEMORY_LIMIT must be a number of bytes"):
        limits.parse_bytes("lots")


_DIRECT = """
import sys, numpy as np, latentrt
unet = latentrt.load(sys.argv[1]).engines["unet"]  # called directly: no pipeline, so no memory check
unet(sample=np.zeros((1, 4, 512, 512), np.float32), timestep=np.zeros(1, np.float32),
     encoder_hidden_states=np.zeros((1, 77, 32), np.float32), timestep_cond=np.zeros((1, 32), np.float32))
"""


def test_engine_allocation_failure_names_component_shapes_and_fix(lcm_bundle, tmp_path):
    """A real ONNX Runtime allocation failure (4096x4096 latents under RLIMIT_AS, the engine called without
    the pipeline's check) comes back as latentrt's error, ORT's message attached, nothing else printed."""
    r = subprocess.run([sys.executable, "-c", _DIRECT, str(lcm_bundle)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                       preexec_fn=_limited(3 << 30), env={**os.environ, "LATENTRT_CACHE": str(tmp_path)})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("latentrt.runtime.engines.base.EngineCallError: unet: the engine failed on inputs "
                           "sample (1, 4, 512, 512), timestep (1,)"), r.stderr
    assert "it ran out of memory: use a smaller height/width" in last
    assert "Engine message (" in last and "alloc" in last.lower()
    assert "[E:onnxruntime" not in r.stderr  # ORT's own log line is not printed next to it


def test_empty_axes_are_refused_before_the_engine(pipe):
    from latentrt.spec import SpecError

    with pytest.raises(SpecError, match=r"unet: the inputs have empty axes \(B=0\)"):
        pipe.engines["unet"](sample=np.zeros((0, 4, 8, 8), np.float32), timestep=np.zeros(0, np.float32),
                             encoder_hidden_states=np.zeros((0, 77, 32), np.float32),
                             timestep_cond=np.zeros((0, 32), np.float32))


def test_engine_failure_hint_for_other_errors():
    from latentrt.runtime.engines.base import engine_errors

    class Fail(RuntimeError):  # stands for ONNX Runtime's InvalidArgument (not a latentrt error)
        pass

    with pytest.raises(EngineCallError, match=r"x: the engine failed on inputs a \(2, 3\); the inputs match the "
                                              r"component's spec.*Engine message \(Fail\): bad shape") as info:
        with engine_errors("x", {"a": np.zeros((2, 3))}):
            raise Fail("bad\n  shape")
    assert isinstance(info.value.__cause__, Fail)


def test_engine_out_of_memory_is_named_as_such():
    from latentrt.runtime.engines.base import engine_errors

    with pytest.raises(EngineCallError, match=r"x: the engine failed on inputs a \(2, 3\); it ran out of memory"):
        with engine_errors("x", {"a": np.zeros((2, 3))}):
            raise MemoryError("Unable to allocate 2 TiB")
