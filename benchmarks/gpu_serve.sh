#!/usr/bin/env bash
# One call on a CUDA machine without internet (carry .whl/: pydantic and its dependencies). Logs and JSON
# under $OUT. Parts: tests (the GPU tests of the decode step and of continuous batching), step
# (benchmarks/serve_step.py at 32K, batches 1/4/8, GPU and offload tiers), agree (bf16 at 4K: the server
# under load against itself alone and against Engine.generate, with 4 slots and with 1).
# Usage: OUT=... bash benchmarks/gpu_serve.sh tests step
set -u
source benchmarks/device_setup.sh
for part in "$@"; do
  started=$(date +%s)
  case "$part" in
    tests)
      timeout 500 python3 -m pytest -m gpu -q -p no:cacheprovider ${PYTEST_ARGS:-tests/} \
        > "$OUT/gpu_tests.log" 2>&1; tail -15 "$OUT/gpu_tests.log" ;;
    step)
      timeout 300 python3 benchmarks/serve_step.py --context 32768 --batches 1,8 --tiers none,cpu --steps 10 \
        > "$OUT/serve_step.json" 2> "$OUT/serve_step.err"; tail -8 "$OUT/serve_step.err" ;;
    agree)
      for slots in 4 1; do
        timeout 150 python3 benchmarks/serve_load.py --model random-llama3-8b --clients 4 --max-batch $slots \
          --seconds 15 --drain-cap 40 --prompt-tokens 4096 --max-tokens 32 --offload cpu --solo 4 --baseline-cap 40 \
          --out "$OUT/agree_slots$slots.json" > /dev/null 2> "$OUT/agree_slots$slots.err"; tail -12 "$OUT/agree_slots$slots.err"
      done ;;
    *) echo "unknown part $part" ;;
  esac
  echo "== $part: $(( $(date +%s) - started )) s"
done
