#!/usr/bin/env bash
# The one prepared device run (device tool): correctness of the fused kernel on the GPU,
# then the attention benchmark. Results land in $OUT (or bench/results without it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
python3 -c "import triton" 2>/dev/null || python3 -m pip install -q triton==3.7.1
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
python3 bench/gpu_correctness.py --out "$out/gpu_correctness.json" 2>&1 | tee "$out/gpu_correctness.log"
python3 bench/bench_attention.py --out "$out/bench_attention_gpu.json" 2>&1 | tee "$out/bench_attention.log"
