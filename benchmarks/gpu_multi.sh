#!/usr/bin/env bash
# Calls on a 2-GPU CUDA machine without internet (carry .whl/: pydantic, deepspeed 0.18.9 pure Python,
# hjson, ninja, msgpack, einops, py-cpuinfo, nvidia-ml-py). Logs and JSON go to $RES; after each part they are
# packed into $OUT/results.tgz (one file, whatever a later part does: a call brings back at most 8 files).
#   tp      a quick 2-rank check on a small Llama (stops the part if it fails), then
#           benchmarks/tensor_parallel.py at 128K: 1 GPU (+ HF), then torchrun 2 GPUs, batch 1 and 4;
#           benchmarks/tp_compare.py compares tokens and selected indices (193 s on 2026-11-30)
#   tp32    the tp part's comparison in float32 (no HF, no check): one GPU, then torchrun 2 GPUs, batch 1 and 4,
#           budgets 1.0 and default, 12 steps; tp_compare.py -> compare_f32.json. In bf16 each rank rounds its
#           partial sums before the all-reduce; in float32 the rounding is 2^16 times finer
#   zero    ZeRO-Inference on one GPU at 32K, Llama-3-8B widths with ZERO_LAYERS layers, the GPU capped at
#           ZERO_GPU_MEMORY. Default 96 layers (44.0 GB of bf16 weights) in 40 GiB: the planner's OmniKV run
#           without weight offload needs 47.5 GB of the 40.8 GB left after headroom. The one-GPU machine has
#           128 GiB of host memory, too little for weights larger than a whole H200: on the 2-GPU machine
#           (256 GiB) ZERO_LAYERS=320 ZERO_GPU_MEMORY= gives 141.7 GB of weights against the uncapped GPU
#   plan    omnikv plan --tp-size 2 (Llama-3-8B geometry without its 8K limit), then tp 2 at its longest
#           decode-only context (2,490,351 with 240 GiB) with budget 2048 (configs/llama3_8b.json's): 140 s on
#           2026-11-30, 56 s of it filling 245 GB of pinned host memory; give this part a call of its own
# The machine's memory grows as it is used, so MemTotal reads far less than its 256 GiB at the start:
# the plans are given --host-memory 240GiB (the rest is for the processes themselves).
# Usage: OUT=... bash benchmarks/gpu_multi.sh tp zero plan   (about 10 minutes: split it over calls of 600 s)
# TP1_BUDGETS=default TP1_HF=0 SMOKE=0 rerun the tp part's 1-GPU leg lighter (only what the comparison needs).
set -u
RES=${RES:-/tmp/omnikv_results}
HOST_MEMORY=${HOST_MEMORY:-240GiB}
TP1_BUDGETS=${TP1_BUDGETS:-1.0,default}
ZERO_LAYERS=${ZERO_LAYERS:-96}
ZERO_GPU_MEMORY=${ZERO_GPU_MEMORY-40GiB}
TP1_HF=${TP1_HF:-1}
SMOKE=${SMOKE:-1}
source benchmarks/device_setup.sh
mkdir -p "$RES"
nvidia-smi topo -m 2>/dev/null | head -4
GEOMETRY=/tmp/llama3_8b_long.json
DEEP=/tmp/llama3_8b_deep.json
python3 -c 'import json, sys; from omnikv_runtime.planner import KNOWN_GEOMETRIES as G
json.dump({**G["llama3-8b"], "max_position_embeddings": 1 << 24}, open(sys.argv[1], "w"))
json.dump({**G["llama3-8b"], "num_hidden_layers": int(sys.argv[3]), "max_position_embeddings": 1 << 24}, open(sys.argv[2], "w"))' \
  "$GEOMETRY" "$DEEP" "$ZERO_LAYERS"
PLAN="python3 -m omnikv_runtime.cli plan --config configs/llama3_8b.json --new-tokens 17 --host-memory $HOST_MEMORY"
for part in "$@"; do
  started=$(date +%s)
  case "$part" in
    tp)
      CHECK="timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/tensor_parallel.py --tiny --context 4096 --batches 1 --steps 8"
      EAGER=""
      if [ "$SMOKE" = 1 ] && ! $CHECK --out /tmp/smoke.json > /tmp/smoke.log 2>&1; then
        echo "2-rank check on a small Llama failed:"; grep -v Warning /tmp/smoke.log | tail -30; cp /tmp/smoke.log "$RES/"
        $CHECK --eager --out /tmp/smoke.json > /tmp/smoke_eager.log 2>&1 || { grep -v Warning /tmp/smoke_eager.log | tail -15; continue; }
        EAGER="--eager"; echo "the check passes without a CUDA graph: the 2-GPU legs run eagerly"
      fi
      grep "^rank 0" /tmp/smoke.log /tmp/smoke_eager.log 2>/dev/null | tail -3
      SEL=/tmp/selections
      HF=$([ "$TP1_HF" = 1 ] && echo --hf)
      timeout 150 python3 benchmarks/tensor_parallel.py --context 131072 $HF --budgets "$TP1_BUDGETS" --selections $SEL \
        --out "$RES/tp1.json" 2> "$RES/tp1.err"
      grep "^rank\|Error" "$RES/tp1.err" | tail -8
      timeout 200 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/tensor_parallel.py --context 131072 --selections $SEL $EAGER \
        --out "$RES/tp2.json" 2> "$RES/tp2.err"
      grep "^rank\|Error" "$RES/tp2.err" | tail -10
      python3 benchmarks/tp_compare.py "$RES/tp1.json" "$RES/tp2.json" --selections $SEL --out "$RES/compare.json" ;;
    tp32)
      SEL=/tmp/selections_f32
      F32="--dtype float32 --context 131072 --batches 1,4 --budgets 1.0,default --steps 12 --selections $SEL"
      timeout 260 python3 benchmarks/tensor_parallel.py $F32 --out "$RES/tp1_f32.json" 2> "$RES/tp1_f32.err"
      grep "^rank\|Error" "$RES/tp1_f32.err" | tail -6
      timeout 260 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/tensor_parallel.py $F32 \
        --out "$RES/tp2_f32.json" 2> "$RES/tp2_f32.err"
      grep "^rank\|Error" "$RES/tp2_f32.err" | tail -10
      python3 benchmarks/tp_compare.py "$RES/tp1_f32.json" "$RES/tp2_f32.json" --selections $SEL --out "$RES/compare_f32.json" ;;
    zero)
      CAP=${ZERO_GPU_MEMORY:+--gpu-memory $ZERO_GPU_MEMORY}
      for weights in "" "--offload-weights"; do
        $PLAN --model-config "$DEEP" --context 32768 $CAP $weights >> "$RES/plan_zero.txt" 2>&1
      done
      grep "weights\|GPU total\|host total\|^fits\|longest context that fits, omnikv" "$RES/plan_zero.txt"
      timeout 400 python3 benchmarks/tensor_parallel.py --zero --layers "$ZERO_LAYERS" $CAP --context 32768 --batches 1 \
        --steps 6 --out "$RES/zero.json" 2> "$RES/zero.err"
      grep "^rank\|Error" "$RES/zero.err" | tail -4 ;;
    plan)
      for tp in 1 2; do
        $PLAN --model-config "$GEOMETRY" --context 131072 --tp-size $tp >> "$RES/plan.txt" 2>&1
      done
      LONGEST=$($PLAN --model-config "$GEOMETRY" --context 131072 --tp-size 2 --json | python3 -c \
        'import json, sys; print(json.load(sys.stdin)["omnikv"]["longest_context_decode_only"]["context"])')
      echo "planner's longest decode-only context on 2 GPUs: $LONGEST"
      $PLAN --model-config "$GEOMETRY" --context "$LONGEST" --tp-size 2 --json > "$RES/plan_longest.json"
      timeout 500 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/tensor_parallel.py --context "$LONGEST" --batches 1 \
        --budgets 2048 --steps 8 --out "$RES/tp2_longest.json" 2> "$RES/tp2_longest.err"
      grep "^rank\|Error" "$RES/tp2_longest.err" | tail -6 ;;
    *) echo "unknown part $part" ;;
  esac
  tar czf "$OUT/results.tgz" -C "$RES" .
  echo "== $part: $(( $(date +%s) - started )) s"
done
