#!/usr/bin/env bash
# Memory planner and profiler runs on a CUDA machine without network access (Llama-3-8B's geometry, random weights: nothing is downloaded).
#   scripts/device_memory.sh capacity   # (a) planner vs allocation, Llama-3-8B geometry, 32K/128K, batch 1 and 4
#   scripts/device_memory.sh longest    # (b) longest context dense / OmniKV, decode at the OmniKV figure
#   scripts/device_memory.sh profile    # PNG (if matplotlib) + Perfetto trace of one 8B-geometry run
#   scripts/device_memory.sh tests      # GPU tests of the planner and profiler
# HOST_MEMORY (default 110GiB; 120GiB reaches ~1M tokens but pins 112 GiB of a 128 GiB host) bounds the pinned host tier for `longest`; results go to $OUT.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source "$REPO/scripts/device_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2
case "${1:-}" in
  capacity)
    python3 -P benchmarks/capacity.py --config llama3_8b --contexts 32768,131072 --batches 1,4 \
      --decode-steps 4 --omnikv-context 0 --out "$OUT/capacity_h100.json" 2>&1 | tail -40 ;;
  longest)
    python3 -P benchmarks/capacity.py --config llama3_8b --contexts "" --decode-steps 4 \
      --host-memory "${HOST_MEMORY:-110GiB}" --omnikv-context "${CONTEXT:-auto}" \
      --out "$OUT/capacity_longest_h100.json" 2>&1 | tail -40 ;;
  profile)
    python3 -P -m omnikv_runtime.cli profile --config llama3_8b --random-weights --prompt-tokens 32768 \
      --max-new-tokens 8 --out "$OUT/profile_gpu" 2>&1 | tail -30
    ls -la "$OUT/profile_gpu" ;;
  tests)
    python3 -P -m pytest "$REPO/tests/test_gpu_memory.py" -m gpu -q -p no:cacheprovider 2>&1 | tail -15 ;;
  *) echo "usage: $0 capacity|longest|profile|tests"; exit 2 ;;
esac
