#!/usr/bin/env bash
# The one prepared device run (device tool): correctness of the fused kernel on the GPU,
# then the attention benchmark, then the DiT block benchmark. Results land in $OUT (or bench/results without it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
python3 -c "import triton" 2>/dev/null || python3 -m pip install -q triton==3.7.1
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
python3 bench/gpu_correctness.py --out "$out/gpu_correctness.json" 2>&1 | tee "$out/gpu_correctness.log"
python3 bench/bench_attention.py --out "$out/bench_attention_gpu.json" 2>&1 | tee "$out/bench_attention.log"
# DiT image prompts at FLUX.1-dev / SD3.5-Large width: one host block unpatched vs patched, bf16
# (bench_dit.py --device cuda; sized for well under 2 minutes, not yet run on a GPU). It imports the host's block classes, so
# it needs the ComfyUI source: $COMFYUI_PATH, else ../shared/host/ComfyUI, else bench/out/host/ComfyUI (bench/out
# is git-ignored: copy the snapshot there and pass carry ["bench/out/host"] to the device tool; 16 MB).
host="${COMFYUI_PATH:-}"
for c in ../shared/host/ComfyUI bench/out/host/ComfyUI; do
  [ -z "$host" ] && [ -f "$c/comfy/model_management.py" ] && host="$c"
done
if [ -n "$host" ]; then
  COMFYUI_PATH="$host" timeout 170 python3 bench/bench_dit.py --device cuda --out "$out/bench_dit_gpu.json" 2>&1 \
    | tee "$out/bench_dit.log"
else
  echo "bench_dit skipped: no ComfyUI source (set COMFYUI_PATH or copy it to bench/out/host/ComfyUI)" | tee "$out/bench_dit.log"
fi
