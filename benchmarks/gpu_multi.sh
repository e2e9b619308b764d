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
#   bf16    (2 GPUs) bf16 at 128K, batch 1 and 4, budgets 1.0 and default, 16 steps: one GPU, then torchrun 2 GPUs
#           without and with distributed.float32_partial_sums (--float32-partial-sums); tp_compare.py of each against
#           one GPU -> compare_bf16_off.json, compare_bf16_on.json (tokens and selections); the two 2-GPU runs' step_ms
#           give the float32 reduction's cost (same card, same call). Then benchmarks/tp_arithmetic.py on one GPU:
#           each source of difference on its own (column-parallel widths, row-parallel partial sums in bf16 and in
#           float32, the decode kernel's split plan by head count) at Llama-3-8B widths -> tp_arithmetic.json.
#           About 6 minutes: a call of its own
#   tp4     (4 GPUs) TP4_CONTEXT tokens (default 131072), batch 1 and 4, budget 2048 (configs/llama3_8b.json's):
#           a 4-rank check on 4K first, then one GPU, torchrun 2 GPUs and torchrun 4 GPUs in the same call;
#           omnikv plan --json for each cell and benchmarks/tp_plan_check.py: the planner's bytes per GPU against
#           each run's peak -> plan_check_<context>.json. TP4_CONTEXT=524288 for 512K (one H100 cannot hold batch
#           4 there: that cell is skipped, not failed). Each context is a call of its own
#   long4   (4 GPUs) the planner's longest context with a prefill on 4 GPUs (plan with LONG4_GPU_MEMORY, default
#           80GB, H100's; 141GB on H200s), the cache filled directly up to its last LONG4_PREFILL tokens (default
#           16384: the last four 4,096-token chunks, which attend to the whole context and set the prefill's peak
#           memory), those run through the model's prefill, then 8 decode steps at budget 2048; tp_plan_check.py
#           against the plan's figure with a prefill. LONG4_PREFILL=all prefills the whole prompt: its attention is
#           quadratic, roughly 20 minutes on four GPUs at 2.57M tokens (11.4 s at 128K on one H200, scaled by the
#           square of the length, split over four), more than one call allows
#   serve2  (2 GPUs) omnikv serve with distributed.tp_size 2 under benchmarks/serve_load.py (torchrun: rank 0 serves
#           and runs the clients, rank 1 follows): 8 clients for 90 s, 32K prompts, 64 new tokens, every response
#           checked against sequential Engine.generate on the same two GPUs, 8 sent again alone -> serve_tp2.json
#   serve1  the same on one GPU of the same machine (the baseline) -> serve_tp1.json
#   serve4  (4 GPUs) the same with distributed.tp_size 4 -> serve_tp4.json
#   The serve parts need .whl/serve/ (FastAPI, uvicorn, the openai client and their dependencies), as gpu_serve.sh.
# The machine's memory grows as it is used, so MemTotal reads far less than its 256 GiB at the start:
# the plans are given --host-memory 240GiB (the rest is for the processes themselves); HOST_MEMORY4 (480GiB) on
# the 4-GPU machine (512 GiB).
# Usage: OUT=... bash benchmarks/gpu_multi.sh tp zero plan   (about 10 minutes: split it over calls of 600 s)
# TP1_BUDGETS=default TP1_HF=0 SMOKE=0 rerun the tp part's 1-GPU leg lighter (only what the comparison needs).
set -u
# NVLink multicast stays off (the machine sets these; a program started with its own environment keeps them)
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
RES=${RES:-/tmp/omnikv_results}
HOST_MEMORY=${HOST_MEMORY:-240GiB}
TP1_BUDGETS=${TP1_BUDGETS:-1.0,default}
ZERO_LAYERS=${ZERO_LAYERS:-96}
ZERO_GPU_MEMORY=${ZERO_GPU_MEMORY-40GiB}
TP1_HF=${TP1_HF:-1}
SMOKE=${SMOKE:-1}
HOST_MEMORY4=${HOST_MEMORY4:-480GiB}
TP4_CONTEXT=${TP4_CONTEXT:-131072}
LONG4_GPU_MEMORY=${LONG4_GPU_MEMORY:-80GB}
LONG4_PREFILL=${LONG4_PREFILL:-16384}
TORCHRUN="python3 -m torch.distributed.run"
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
PLAN4="python3 -m omnikv_runtime.cli plan --config configs/llama3_8b.json --new-tokens 17 --host-memory $HOST_MEMORY4"
SERVE="benchmarks/serve_load.py --model random-llama3-8b --clients 8 --max-batch 8 --seconds 90 --drain-cap 120"
SERVE="$SERVE --prompt-tokens 32768 --max-tokens 64 --offload cpu --solo 8 --baseline-cap 150"
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
    bf16)
      SEL=/tmp/selections_bf16
      B16="--context 131072 --batches 1,4 --budgets 1.0,default --steps 16 --selections $SEL"
      timeout 200 python3 benchmarks/tensor_parallel.py $B16 --out "$RES/bf16_tp1.json" 2> "$RES/bf16_tp1.err"
      grep "^rank\|Error" "$RES/bf16_tp1.err" | tail -6
      for sums in off on; do
        FLAG=$([ "$sums" = on ] && echo --float32-partial-sums)
        timeout 200 $TORCHRUN --nproc-per-node 2 benchmarks/tensor_parallel.py $B16 $FLAG --out "$RES/bf16_tp2_$sums.json" \
          2> "$RES/bf16_tp2_$sums.err"
        grep "^rank 0\|Error" "$RES/bf16_tp2_$sums.err" | tail -6
        python3 benchmarks/tp_compare.py "$RES/bf16_tp1.json" "$RES/bf16_tp2_$sums.json" --selections $SEL \
          --out "$RES/compare_bf16_$sums.json"
      done
      timeout 120 python3 benchmarks/tp_arithmetic.py --out "$RES/tp_arithmetic.json" 2> "$RES/tp_arithmetic.err"
      grep -v "^column.* 0 \|^attention.* 0 " "$RES/tp_arithmetic.err" | head -40 ;;
    tp4)
      C4="--context $TP4_CONTEXT --batches 1,4 --budgets 2048 --steps 16"
      timeout 150 $TORCHRUN --nproc-per-node 4 benchmarks/tensor_parallel.py --context 4096 --batches 1 --steps 4 \
        --out /tmp/smoke4.json > /tmp/smoke4.log 2>&1 || { echo "4-rank check failed:"; grep -v Warning /tmp/smoke4.log | tail -30; continue; }
      for tp in 1 2 4; do
        for batch in 1 4; do
          $PLAN4 --model-config "$GEOMETRY" --context "$TP4_CONTEXT" --batch $batch --tp-size $tp --json \
            > "$RES/plan_tp${tp}_${TP4_CONTEXT}_b$batch.json" 2>> "$RES/plan4.err"
        done
        timeout 240 $TORCHRUN --nproc-per-node $tp benchmarks/tensor_parallel.py $C4 --out "$RES/tp4_${TP4_CONTEXT}_tp$tp.json" \
          2> "$RES/tp4_${TP4_CONTEXT}_tp$tp.err"
        grep "^rank 0\|Error" "$RES/tp4_${TP4_CONTEXT}_tp$tp.err" | tail -4
      done
      python3 benchmarks/tp_plan_check.py --plans "$RES"/plan_tp*_${TP4_CONTEXT}_b*.json \
        --runs "$RES"/tp4_${TP4_CONTEXT}_tp*.json --out "$RES/plan_check_$TP4_CONTEXT.json" ;;
    long4)
      LONG4_PLAN="$PLAN4 --model-config $GEOMETRY --tp-size 4 --gpu-memory $LONG4_GPU_MEMORY"
      LONGEST=$($LONG4_PLAN --context 131072 --json | python3 -c \
        'import json, sys; print(json.load(sys.stdin)["omnikv"]["longest_context"]["context"])')
      echo "planner's longest context with a prefill on 4 GPUs ($LONG4_GPU_MEMORY each): $LONGEST"
      $LONG4_PLAN --context "$LONGEST" --json > "$RES/plan_long4.json"
      timeout 560 $TORCHRUN --nproc-per-node 4 benchmarks/tensor_parallel.py --context "$LONGEST" --batches 1 \
        --budgets 2048 --steps 8 --prefill "$LONG4_PREFILL" --out "$RES/tp4_longest.json" 2> "$RES/tp4_longest.err"
      grep "^rank\|Error" "$RES/tp4_longest.err" | tail -6
      python3 benchmarks/tp_plan_check.py --plans "$RES/plan_long4.json" --runs "$RES/tp4_longest.json" \
        --out "$RES/plan_check_long4.json" ;;
    serve1|serve2|serve4)
      ranks=${part#serve}
      timeout 560 $TORCHRUN --nproc-per-node "$ranks" $SERVE --out "$RES/serve_tp$ranks.json" > /dev/null \
        2> "$RES/serve_tp$ranks.err"
      grep -v "Warning\|^\[" "$RES/serve_tp$ranks.err" | tail -12 ;;
    *) echo "unknown part $part" ;;
  esac
  tar czf "$OUT/results.tgz" -C "$RES" .
  echo "== $part: $(( $(date +%s) - started )) s"
done
