#!/usr/bin/env bash
# The GPU checks of issue 6 as one prepared run, for a session that has a GPU machine:
#   1. environment: GPU, torch CUDA, TensorRT, onnxruntime providers
#   2. tests/gpu (torch CUDA parity with CPU at fp16 tolerance, ORT CUDA I/O binding, TensorRT build/run)
#   3. benchmarks/gpu_lcm_latency.py (LCM 512x512, 4 steps: torch CUDA backend vs diffusers fp16 eager)
# Results go to $OUT (default ./gpu-results). PYTHON picks the interpreter (default: python3).
# Each step has its own time limit so that a slow step cannot eat the others' time.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export LATENTRT_BENCH_CACHE=${LATENTRT_BENCH_CACHE:-$OUT/bench-cache}

{
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1
  "$PY" - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for m in ("tensorrt", "onnxruntime", "diffusers", "transformers"):
    spec = importlib.util.find_spec(m)
    if spec is None:
        print(m, "not installed"); continue
    mod = __import__(m)
    print(m, getattr(mod, "__version__", "?"))
import onnxruntime as ort
print("ort providers", ort.get_available_providers())
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 420 "$PY" -m pytest -q tests/gpu -rA -p no:cacheprovider --basetemp="$OUT/pytest-tmp" \
  --junitxml="$OUT/gpu-tests.xml" 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"

timeout 480 "$PY" benchmarks/gpu_lcm_latency.py --repeats 20 --warmup 3 --out "$OUT/gpu-lcm-latency.json" \
  2>&1 | tail -40 | tee "$OUT/gpu-lcm-latency.txt"
