"""Tensor-parallel OmniKV against one GPU, and ZeRO-Inference weight offload, on random bf16 weights.

Every rank runs this script (``torchrun --nproc-per-node N``; ``N = 1`` is the single-GPU reference).
The model is Llama-3-8B's geometry with seeded random weights; the caches are filled directly with
seeded random KV (no prefill), each rank taking its own KV heads' slice of the same full KV, so
the N-rank run must give the single GPU's greedy tokens (budget 1.0) and the same selected
indices per filter layer and step (the default budget). Per batch: decode ms per step (median),
peak GPU memory of this rank, host resident memory, tokens and selections (rank 0 writes JSON).

    torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --context 131072 --out tp2.json
    torchrun --nproc-per-node 1 benchmarks/tensor_parallel.py --context 131072 --hf --out tp1.json
    python benchmarks/tensor_parallel.py --zero --context 32768 --layers 64 --out zero.json

``--hf`` adds single-GPU transformers (DynamicCache, every layer's KV on the GPU) when it fits.
``--zero`` runs one GPU under ``distributed.offload_weights`` (``--layers`` deepens the geometry so
the weights exceed the GPU) and reports the PCIe floor: weights plus selected rows per step over the
pinned-copy bandwidth measured here. ``--tiny`` checks the script on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import psutil
import torch

import omnikv_runtime as okv
from omnikv_runtime.config import load_config
from omnikv_runtime.decode_loop import DecodeLoop, StopSettings
from omnikv_runtime.listeners import SelectionRecorder
from omnikv_runtime.random_model import random_model
from omnikv_runtime.sampling import SamplingSettings

FILTER_LAYERS = [2, 8, 18]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill(cache: okv.OmniKVCache, layers: int, kv_heads: int, head_dim: int, batch: int, context: int, device, dtype):
    """The same full random KV on every rank (seeded per layer and chunk); each rank appends its heads' slice."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    mine = slice(rank * kv_heads // world, (rank + 1) * kv_heads // world)
    chunk = 16384
    for start in range(0, context, chunk):
        count = min(chunk, context - start)
        for layer in range(layers):
            gen = torch.Generator(device=device).manual_seed(layer * 1_000_003 + start)
            full = torch.randn(2, batch, kv_heads, count, head_dim, generator=gen, device=device, dtype=dtype)
            cache.append_prompt_kv(layer, full[0][:, mine].contiguous(), full[1][:, mine].contiguous())
    sync(device)


def run(args: argparse.Namespace, batch: int, budget: float | int, engine, model, text, device, dtype) -> dict:
    steps = args.steps
    cache = engine.new_cache(reserve_tokens=args.context + steps + 64, prompt_tokens=args.context)
    head_dim = text.hidden_size // text.num_attention_heads
    fill(cache, text.num_hidden_layers, text.num_key_value_heads, head_dim, batch, args.context, device, dtype)
    cache.budget = lambda context, k=budget: min(context, k if isinstance(k, int) else max(1, int(k * context)))
    use_graph = engine.graph_blocker() is None
    loop = DecodeLoop(
        model, cache, engine.cache_keyword, SamplingSettings(), StopSettings(), steps + 1, use_graph=use_graph
    )
    loop.start_after_fill(batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trace = SelectionRecorder(contexts=False)
    times = []
    with engine.listening(trace):
        for _ in range(steps):
            started = time.perf_counter()
            loop.run_step()
            sync(device)
            times.append((time.perf_counter() - started) * 1e3)
    selections: dict[str, list] = {}
    for event in trace.records:
        selections.setdefault(str(event.layer), []).append(event.indices.tolist())
    timed = times[3:] if len(times) > 4 else times
    return {
        "batch": batch,
        "budget": budget,
        "step_ms": round(statistics.median(timed), 3),
        "cuda_graph": use_graph,
        "tokens": loop.tokens[:, :steps].tolist(),
        "selections": selections,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "host_rss_bytes": psutil.Process().memory_info().rss,
        "tier_bytes": cache.tier_bytes(),
    }


def hf_row(model, batch: int, context: int, steps: int, device, dtype) -> dict[str, Any]:
    from transformers import DynamicCache

    text = model.config
    cache = DynamicCache(config=text)
    head_dim = text.hidden_size // text.num_attention_heads
    try:
        for layer in range(text.num_hidden_layers):
            shape = (batch, text.num_key_value_heads, context, head_dim)
            cache.update(
                torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype), layer
            )
    except torch.OutOfMemoryError:
        return {"batch": batch, "path": "hf_dynamic", "skipped": "KV does not fit one GPU"}
    ids = torch.full((batch, 1), 5, device=device)
    times = []
    with torch.inference_mode():
        for step in range(steps):
            started = time.perf_counter()
            position = torch.full((batch, 1), context + step, device=device)
            ids = model(input_ids=ids, position_ids=position, past_key_values=cache).logits[:, -1:].argmax(-1)
            sync(device)
            times.append((time.perf_counter() - started) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {
        "batch": batch,
        "path": "hf_dynamic",
        "step_ms": round(statistics.median(times[2:] or times), 3),
        "gpu_peak_bytes": peak,
    }


def pinned_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    host = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(host, device=device)
    target.copy_(host, non_blocking=True)
    sync(device)
    started = time.perf_counter()
    for _ in range(5):
        target.copy_(host, non_blocking=True)
    sync(device)
    return 5 * host.numel() / (time.perf_counter() - started) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--hf", action="store_true", help="add single-GPU transformers (DynamicCache)")
    parser.add_argument("--zero", action="store_true", help="ZeRO-Inference weight offload, one GPU")
    parser.add_argument("--layers", type=int, help="decoder layers (default: Llama-3-8B's 32)")
    parser.add_argument("--tiny", action="store_true", help="a small geometry on CPU (checks the script)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    config = {
        "model": {"dtype": dtype_name},
        "omnikv": {"filter_layers": FILTER_LAYERS, "wait_layers": 1},
        "offload": {"device": "cpu"},
        "distributed": {"tp_size": world, "offload_weights": args.zero},
    }
    base = load_config(config)
    from omnikv_runtime.planner import KNOWN_GEOMETRIES
    from omnikv_runtime.random_model import SMALL_LLAMA

    spec = dict(SMALL_LLAMA if args.tiny else KNOWN_GEOMETRIES["llama3-8b"])
    spec.setdefault("vocab_size", 1000)
    spec["num_hidden_layers"] = args.layers or spec.get("num_hidden_layers", 24)
    path = f"/tmp/omnikv_geometry_{'tiny' if args.tiny else 'llama3'}_{spec['num_hidden_layers']}.json"
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    base.model.name_or_path = path
    # ZeRO-Inference offloads the weights, so they start on the CPU. Tensor-parallel ranks build the full
    # random model on their own GPU and DeepSpeed keeps their shard: on the CPU, under torchrun's
    # OMP_NUM_THREADS=1, initialising 8B random weights per rank took longer than a 90 s limit on the H200 pair
    on_cpu_first = args.zero
    model = random_model(base, device="cpu" if on_cpu_first else device, min_positions=args.context + 1024)
    text = model.config
    dtype = getattr(torch, dtype_name)
    engine = okv.initialize(model, base)
    result: dict[str, Any] = {
        "world": world,
        "context": args.context,
        "zero": args.zero,
        "layers": text.num_hidden_layers,
    }
    result["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["rows"] = []
    default_budget = base.omnikv.token_budget
    for batch in [int(b) for b in args.batches.split(",")]:
        budgets = [default_budget] if args.zero else [1.0, default_budget]
        for budget in budgets:
            result["rows"].append(run(args, batch, budget, engine, engine.model, text, device, dtype))
            torch.cuda.empty_cache() if device.type == "cuda" else None
    if args.zero:
        gbps = pinned_gbps(device)
        weights = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.model.parameters()) * 2
        result["pinned_gbps"] = gbps
        for row in result["rows"]:
            selected = row["tier_bytes"]["gpu_selected"]  # the staging buffers: budget rows of every sparse layer
            row["weights_bytes_per_step"] = weights
            row["pcie_floor_ms"] = round((weights + selected) / (gbps * 1e9) * 1e3, 2) if gbps else None
    if args.hf and world == 1 and not args.zero:
        for batch in [int(b) for b in args.batches.split(",")]:
            result["rows"].append(hf_row(engine.model, batch, args.context, 8, device, dtype))
            torch.cuda.empty_cache() if device.type == "cuda" else None
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
    for row in result["rows"]:
        summary = {k: v for k, v in row.items() if k not in ("tokens", "selections", "tier_bytes")}
        print(f"rank {os.environ.get('RANK', '0')}: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
