#!/usr/bin/env bash
# One call on a CUDA machine without internet: install the carried wheels (.whl/, pydantic and
# its dependencies) and the package, then run the named parts, each logging under $OUT:
#   tests   pytest -m gpu tests/ (every GPU test file)   kernels  benchmarks/decode_kernels.py
#   decode  benchmarks/decode.py    e2e      benchmarks/end_to_end.py
#   capacity  benchmarks/capacity.py at the planner's longest context, model-dtype and FP8 host
#             tiers (plus `omnikv plan` for this machine)
#   fp8decode benchmarks/decode.py, offload with a model-dtype and an FP8 host tier
# Extra arguments for a part come from DECODE_ARGS, E2E_ARGS, KERNEL_ARGS, PYTEST_ARGS,
# CAPACITY_ARGS, FP8_DECODE_ARGS.
# Usage: bash benchmarks/gpu_session.sh tests kernels decode e2e
set -u
source benchmarks/device_setup.sh
for part in "$@"; do
  started=$(date +%s)
  case "$part" in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_ARGS:-tests/} \
             > "$OUT/pytest_gpu.log" 2>&1; tail -15 "$OUT/pytest_gpu.log" ;;
    kernels) python3 benchmarks/decode_kernels.py ${KERNEL_ARGS:-} > "$OUT/kernels.json" 2> "$OUT/kernels.err"; tail -12 "$OUT/kernels.err" ;;
    decode) python3 benchmarks/decode.py ${DECODE_ARGS:-} --out "$OUT/decode.json" > /dev/null 2> "$OUT/decode.err"
            grep -v "^\[" "$OUT/decode.err" | tail -25 ;;
    e2e) python3 benchmarks/end_to_end.py ${E2E_ARGS:-} > "$OUT/e2e.json" 2> "$OUT/e2e.err"; tail -8 "$OUT/e2e.err" ;;
    capacity)  # the plan for Llama-3-8B's geometry without its trained 8K position limit (random weights)
      python3 -c 'import json, sys; from omnikv_runtime.planner import KNOWN_GEOMETRIES as G
json.dump({**G["llama3-8b"], "max_position_embeddings": 1 << 24}, open(sys.argv[1], "w"))' "$OUT/llama3_8b_long.json"
      python3 -m omnikv_runtime.cli plan --config configs/llama3_8b.json --model-config "$OUT/llama3_8b_long.json" \
        --context 1048576 --new-tokens 13 > "$OUT/plan.txt" 2>&1; tail -4 "$OUT/plan.txt"
      python3 benchmarks/capacity.py ${CAPACITY_ARGS:---contexts 131072 --batches 1 --host-dtypes auto,float8_e4m3fn \
        --decode-steps 12 --cuda-graph} --out "$OUT/capacity.json" > "$OUT/capacity.log" 2>&1
      tail -12 "$OUT/capacity.log" ;;
    fp8decode)
      python3 benchmarks/decode.py ${FP8_DECODE_ARGS:---contexts 32768,131072 --batches 1 --budgets 2048 --hf= \
        --modes offload,offload_fp8 --hot-multiples=} --out "$OUT/decode_fp8.json" > /dev/null 2> "$OUT/decode_fp8.err"
      grep -v "^\[" "$OUT/decode_fp8.err" | tail -12 ;;
    *) echo "unknown part $part" ;;
  esac
  echo "== $part: $(( $(date +%s) - started )) s"
done
