#!/usr/bin/env bash
# One call on a CUDA machine without internet (carry .whl/: pydantic and its dependencies). Logs and JSON
# under $OUT. Parts: tests (the GPU tests of the decode step and of continuous batching), step
# (benchmarks/serve_step.py at 32K, batches 1/4/8, GPU and offload tiers), agree (bf16 at 4K: the server
# under load against itself alone and against Engine.generate, with 4 slots and with 1), peer (benchmarks/serve_peer.py:
# omnikv serve against transformers serve, 16 requests of 8K-32K tokens at 0.5 a second; PEER_ARGS adds flags, e.g.
# PEER_ARGS="--servers omnikv" and then "--servers transformers" in two calls on the same warm machine), concurrent
# (benchmarks/serve_concurrent.py: as many 128K-token requests at once as the planner fits, against transformers'
# continuous batching's paged cache; CONCURRENT_ARGS adds flags, e.g. "--host-dtype float8_e4m3fn"), invariant
# (generation.batch_invariant: its linear against cuBLAS, its GPU tests, then 14 requests of 128K tokens against
# solo generate with it on; about 10 minutes, two calls where a call is shorter: its three commands one by one).
# lone (benchmarks/serve_step.py at 32K, offload: the step of a request alone in 8 slots against generate's
# batch-1 step; run it on two trees in one call to compare them).
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
    lone)
      timeout 300 python3 benchmarks/serve_step.py --context 32768 --batches 1,8 --tiers cpu --steps 10 \
        > "$OUT/serve_step_lone.json" 2> "$OUT/serve_step_lone.err"; tail -4 "$OUT/serve_step_lone.err" ;;
    agree)
      for slots in 4 1; do
        timeout 150 python3 benchmarks/serve_load.py --model random-llama3-8b --clients 4 --max-batch $slots \
          --seconds 15 --drain-cap 40 --prompt-tokens 4096 --max-tokens 32 --offload cpu --solo 4 --baseline-cap 40 \
          --out "$OUT/agree_slots$slots.json" > /dev/null 2> "$OUT/agree_slots$slots.err"; tail -12 "$OUT/agree_slots$slots.err"
      done ;;
    peer)
      timeout 590 python3 benchmarks/serve_peer.py --model random-llama3-8b --requests 16 --rate 0.5 \
        --prompt-tokens 8192..32768 --new-tokens 128..256 --shared-fraction 0.5 --max-batch 16 \
        --model-folder /tmp/serve_peer_model ${PEER_ARGS:-} --out "$OUT/serve_peer.json" > /dev/null \
        2> "$OUT/serve_peer.err"; tail -12 "$OUT/serve_peer.err" ;;
    concurrent)
      timeout 590 python3 benchmarks/serve_concurrent.py --context 131072 --new-tokens 512 --offload cpu \
        ${CONCURRENT_ARGS:-} --out "$OUT/serve_concurrent.json" > /dev/null 2> "$OUT/serve_concurrent.err"
      tail -8 "$OUT/serve_concurrent.err" ;;
    invariant)
      timeout 120 python3 benchmarks/attention_batch_invariance.py --linear-only --out "$OUT/linear.json" \
        > /dev/null 2> "$OUT/linear.err"; tail -12 "$OUT/linear.err"
      timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_invariant_linear.py \
        > "$OUT/invariant_tests.log" 2>&1; tail -3 "$OUT/invariant_tests.log"
      timeout 450 python3 benchmarks/serve_concurrent.py --context 131072 --new-tokens 512 --solo 2 --no-peer \
        --offload cpu --host-dtype float8_e4m3fn --batch-invariant --out "$OUT/serve_concurrent_invariant.json" \
        > /dev/null 2> "$OUT/serve_concurrent_invariant.err"; tail -5 "$OUT/serve_concurrent_invariant.err" ;;
    *) echo "unknown part $part" ;;
  esac
  echo "== $part: $(( $(date +%s) - started )) s"
done
