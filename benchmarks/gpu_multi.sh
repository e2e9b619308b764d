#!/usr/bin/env bash
# One call on a 2-GPU CUDA machine without internet (carry .whl/: pydantic, deepspeed 0.18.9 pure Python,
# hjson, ninja, msgpack, einops, py-cpuinfo, nvidia-ml-py). Logs and JSON under $OUT. About 8 minutes.
#   tp      benchmarks/tensor_parallel.py at 128K: 1 GPU (+ HF) then torchrun 2 GPUs, batch 1 and 4
#   plan    omnikv plan --tp-size 2 (Llama-3-8B geometry without its 8K limit), then tp 2 at its longest context
#   zero    ZeRO-Inference on one GPU at 32K, Llama-3-8B widths with 320 layers (about 141 GB of bf16 weights)
# Usage: bash benchmarks/gpu_multi.sh tp plan zero
set -u
OUT=${OUT:-/tmp/omnikv_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/omnikv_install.log 2>&1 \
  || { echo "install failed"; tail -20 /tmp/omnikv_install.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import json, sys; from omnikv_runtime.planner import KNOWN_GEOMETRIES as G
json.dump({**G["llama3-8b"], "max_position_embeddings": 1 << 24}, open(sys.argv[1], "w"))' "$OUT/llama3_8b_long.json"
TP="timeout 280 torchrun --nproc-per-node"
for part in "$@"; do
  started=$(date +%s)
  case "$part" in
    tp)
      timeout 200 python3 benchmarks/tensor_parallel.py --context 131072 --hf --out "$OUT/tp1.json" 2> "$OUT/tp1.err"
      grep "^rank" "$OUT/tp1.err" | tail -8
      $TP 2 benchmarks/tensor_parallel.py --context 131072 --out "$OUT/tp2.json" 2> "$OUT/tp2.err"
      grep "^rank" "$OUT/tp2.err" | tail -8
      python3 -c 'import json, sys; a, b = (json.load(open(p)) for p in sys.argv[1:])
for x, y in zip(a["rows"], b["rows"]):
    if "tokens" in x: print("batch", x["batch"], "budget", x["budget"], "same tokens", x["tokens"] == y["tokens"],
                            "same selections", x["selections"] == y["selections"])' "$OUT/tp1.json" "$OUT/tp2.json" ;;
    plan)
      for tp in 1 2; do
        python3 -m omnikv_runtime.cli plan --config configs/llama3_8b.json --model-config "$OUT/llama3_8b_long.json" \
          --context 131072 --new-tokens 17 --tp-size $tp --json > "$OUT/plan_tp$tp.json" 2> "$OUT/plan_tp$tp.err"
      done
      python3 -m omnikv_runtime.cli plan --config configs/llama3_8b.json --model-config "$OUT/llama3_8b_long.json" \
        --context 131072 --new-tokens 17 --tp-size 2 > "$OUT/plan_tp2.txt" 2>&1; tail -5 "$OUT/plan_tp2.txt"
      LONGEST=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["omnikv"]["longest_context_decode_only"]["context"])' "$OUT/plan_tp2.json")
      echo "planner's longest decode-only context on 2 GPUs: $LONGEST"
      $TP 2 benchmarks/tensor_parallel.py --context "$LONGEST" --batches 1 --steps 8 --out "$OUT/tp2_longest.json" \
        2> "$OUT/tp2_longest.err"; grep "^rank\|Error" "$OUT/tp2_longest.err" | tail -4 ;;
    zero)
      python3 -m omnikv_runtime.cli plan --config configs/llama3_8b.json --model-config "$OUT/llama3_8b_long.json" \
        --context 32768 --new-tokens 17 --offload-weights > "$OUT/plan_zero.txt" 2>&1; tail -4 "$OUT/plan_zero.txt"
      timeout 250 python3 benchmarks/tensor_parallel.py --zero --layers 320 --context 32768 --batches 1 --steps 6 \
        --out "$OUT/zero.json" 2> "$OUT/zero.err"; grep "^rank\|Error" "$OUT/zero.err" | tail -4 ;;
    *) echo "unknown part $part" ;;
  esac
  echo "== $part: $(( $(date +%s) - started )) s"
done
