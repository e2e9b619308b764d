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
pinned-copy bandwidth measured here. ``--gpu-memory`` caps the process's GPU memory (a smaller card, on
a machine whose host memory cannot hold weights larger than the whole GPU). ``--tiny`` checks the
script on CPU (on a GPU: a quick check of the same path on a small Llama). ``--selections DIR`` saves
every rank's selected indices per budget, batch, filter layer and step (``benchmarks/tp_compare.py``
compares two runs' files). ``--prefill TOKENS`` runs the model's chunked prefill over the context's last
TOKENS tokens (``all``: the whole context) after filling the rest directly, and reports its time and peak
GPU memory: the last chunks of a long context attend to all of it, so they carry the prefill's peak.
``--float32-partial-sums`` sets ``distributed.float32_partial_sums`` (its cost: the step time against a run
without it; its tokens: ``tp_compare.py`` against one GPU).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
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
from omnikv_runtime.decode.loop import DecodeLoop, StopSettings, cached_forward
from omnikv_runtime.decode.sampling import SamplingSettings
from omnikv_runtime.geometry import ModelGeometry
from omnikv_runtime.models.random import random_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kv_fill.py, also under python -P
from kv_fill import fill_prompt  # noqa: E402

FILTER_LAYERS = [2, 8, 18]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill(cache: okv.OmniKVCache, layers: int, kv_heads: int, head_dim: int, batch: int, context: int, device, dtype):
    """The same full random KV on every rank (seeded per layer and chunk); each rank appends its heads' slice."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    mine = slice(rank * kv_heads // world, (rank + 1) * kv_heads // world)

    def layer_kv(layer: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(layer * 1_000_003 + start)
        full = torch.randn(2, batch, kv_heads, count, head_dim, generator=gen, device=device, dtype=dtype)
        return full[0][:, mine].contiguous(), full[1][:, mine].contiguous()

    fill_prompt(cache, context, 16384, layer_kv)
    sync(device)


def run(
    args: argparse.Namespace, batch: int, budget: float | int, engine, model, geometry: ModelGeometry, device, dtype
) -> dict:
    steps = args.steps
    cache = engine.new_cache(reserve_tokens=args.context + steps + 64, prompt_tokens=args.context)
    cache.token_budget_for = lambda context, k=budget: min(
        context, k if isinstance(k, int) else max(1, int(k * context))
    )
    prefilled = min(args.context, args.context if args.prefill == "all" else int(args.prefill or 0))
    started = time.perf_counter()
    if args.context > prefilled:
        filled = args.context - prefilled
        fill(cache, geometry.num_layers, geometry.kv_heads, geometry.head_dim, batch, filled, device, dtype)
    fill_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    prefill(engine, cache, batch, args.context - prefilled, args.context, device)
    prefill_s = time.perf_counter() - started
    prefill_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    use_graph = engine.graph_blocker() is None
    loop = DecodeLoop(
        model, cache, engine.cache_keyword, SamplingSettings(), StopSettings(), steps + 1, use_graph=use_graph
    )
    loop.start_after_fill(batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    # filter layer -> per step [batch, k], sorted per row: read from the segments' selection buffers after
    # each step, so the steps replayed from a CUDA graph count too (listeners see eager steps only)
    selections: dict[int, list[torch.Tensor]] = {}
    for _ in range(steps):
        started = time.perf_counter()
        loop.run_step()
        sync(device)
        times.append((time.perf_counter() - started) * 1e3)
        for segment in cache.tiers.segments:
            if segment.selection is not None:
                chosen = segment.selection.sort(dim=1).values.to("cpu", torch.int32)
                selections.setdefault(segment.filter_layer, []).append(chosen)
    timed = times[3:] if len(times) > 4 else times
    row = {
        "batch": batch,
        "budget": budget,
        "selected": {str(layer): chosen[-1].shape[1] for layer, chosen in selections.items()},
        "step_ms": round(statistics.median(timed), 3),
        "steps_ms": [round(t, 2) for t in times],
        "fill_s": round(fill_s, 1),
        "prefill_tokens": prefilled,
        "prefill_s": round(prefill_s, 2),
        "gpu_peak_prefill_bytes": prefill_peak,
        "cuda_graph": use_graph,
        "tokens": loop.tokens[:, :steps].tolist(),
        # one digest per filter layer and step (equal digests: equal sorted indices in every row)
        "selection_digests": {
            str(layer): [hashlib.sha1(c.numpy().tobytes()).hexdigest()[:16] for c in chosen]
            for layer, chosen in selections.items()
        },
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "host_rss_bytes": psutil.Process().memory_info().rss,
        "host_used_bytes": host_used(),  # the whole machine's (every rank's tiers, the OS, ...)
        "tier_bytes": cache.tier_bytes(),
    }
    if args.selections:
        rank = os.environ.get("RANK", "0")
        name = f"sel_w{row_world()}_r{rank}_b{batch}_k{budget}.pt"
        torch.save({layer: torch.stack(chosen) for layer, chosen in selections.items()}, f"{args.selections}/{name}")
    return row


def prefill(engine, cache: okv.OmniKVCache, batch: int, start: int, end: int, device: torch.device) -> None:
    """The model's chunked prefill of columns ``[start, end)`` through ``cache`` (filled up to ``start``):
    random token ids, the same on every rank, in chunks of the config's ``prefill.chunk_size``."""
    if end <= start:
        return
    chunk = engine.config.prefill.chunk_size or end - start
    generator = torch.Generator().manual_seed(start)
    ids = torch.randint(3, engine.model.config.vocab_size, (batch, end - start), generator=generator).to(device)
    mask = torch.ones(batch, end, dtype=torch.long, device=device)
    for first in range(start, end, chunk):  # no inference mode: the decode loop then writes these buffers
        last = min(first + chunk, end)
        columns = torch.arange(first, last, device=device)
        part, positions = ids[:, first - start : last - start], columns.expand(batch, -1)
        cached_forward(engine.model, cache, engine.cache_keyword, part, positions, mask[:, :last], columns)
    sync(device)


def host_used() -> int:
    memory = psutil.virtual_memory()
    return memory.total - memory.available


def row_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gather_ranks(row: dict) -> None:
    """Rank 0's row gets every rank's GPU peak and resident memory, and whether the ranks chose alike."""
    import torch.distributed as dist

    if row_world() == 1 or not dist.is_initialized():
        return
    mine = {
        k: row[k] for k in ("gpu_peak_bytes", "gpu_peak_prefill_bytes", "host_rss_bytes", "tokens", "selection_digests")
    }
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    row["gpu_peak_bytes_per_rank"] = [r["gpu_peak_bytes"] for r in every]
    row["gpu_peak_prefill_bytes_per_rank"] = [r["gpu_peak_prefill_bytes"] for r in every]
    row["host_rss_bytes_per_rank"] = [r["host_rss_bytes"] for r in every]
    row["ranks_same_tokens"] = all(r["tokens"] == row["tokens"] for r in every)
    row["ranks_same_selections"] = all(r["selection_digests"] == row["selection_digests"] for r in every)


def release(device: torch.device) -> None:
    """Free the last run's cache and captured graph (pinned host tier included) before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_row(model, batch: int, context: int, steps: int, device, dtype) -> dict[str, Any]:
    from transformers import DynamicCache

    geometry = ModelGeometry.from_model(model)
    cache = DynamicCache(config=model.config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for layer in range(geometry.num_layers):
            shape = (batch, geometry.kv_heads, context, geometry.head_dim)
            cache.update(
                torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype), layer
            )
    except torch.OutOfMemoryError:
        del cache
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
        "steps_ms": [round(t, 2) for t in times],
        "gpu_peak_bytes": peak,
        "host_rss_bytes": psutil.Process().memory_info().rss,
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


def random_on_host(base, device: torch.device, min_positions: int):
    """The model on the CPU for ZeRO-Inference, its random matrices drawn on ``device`` (the GPU) and
    copied over: drawing ~140 GB of bf16 weights with the CPU's generator takes minutes. Norms are ones."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return random_model(base, device="cpu", min_positions=min_positions)
    with no_init_weights():
        model = random_model(base, device="cpu", min_positions=min_positions)
    generator = torch.Generator(device=device).manual_seed(0)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() < 2:
                param.fill_(1.0)
                continue
            for rows in param.split(16384):
                drawn = torch.randn(rows.shape, device=device, dtype=torch.float32, generator=generator)
                rows.copy_(drawn.mul_(std).to(param.dtype))
    return model


def parse_budget(text: str, default: float | int) -> float | int:
    if text == "default":
        return default
    return float(text) if "." in text else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument(
        "--budgets", help="token budgets: counts, fractions, or 'default' (default: 1.0,default; --zero: default)"
    )
    parser.add_argument("--selections", help="a folder for every rank's selected indices (torch.save files)")
    parser.add_argument("--hf", action="store_true", help="add single-GPU transformers (DynamicCache)")
    parser.add_argument("--zero", action="store_true", help="ZeRO-Inference weight offload, one GPU")
    parser.add_argument("--layers", type=int, help="decoder layers (default: Llama-3-8B's 32)")
    parser.add_argument(
        "--gpu-memory", help="cap this process's GPU memory, e.g. 40GiB (torch.cuda.set_per_process_memory_fraction)"
    )
    parser.add_argument("--tiny", action="store_true", help="a small geometry on CPU (checks the script)")
    parser.add_argument("--eager", action="store_true", help="decode steps without a CUDA graph")
    parser.add_argument(
        "--prefill",
        help="run the model's chunked prefill over the context's last TOKENS tokens ('all': the whole context) "
        "after filling the rest directly; its time and peak GPU memory are reported (default: no prefill)",
    )
    parser.add_argument(
        "--float32-partial-sums",
        action="store_true",
        help="distributed.float32_partial_sums: the row-parallel layers all-reduce float32 partial sums",
    )
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="weights and KV (default: bfloat16 on CUDA, else float32)"
    )
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
        if args.gpu_memory:
            from omnikv_runtime.planner import parse_bytes

            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(parse_bytes(args.gpu_memory, "--gpu-memory") / total, device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    config = {
        "model": {"dtype": dtype_name},
        "omnikv": {"filter_layers": FILTER_LAYERS, "wait_layers": 1},
        "offload": {"device": "cpu"},
        "distributed": {
            "tp_size": world,
            "offload_weights": args.zero,
            "float32_partial_sums": args.float32_partial_sums,
        },
        "generation": {"cuda_graphs": not args.eager},
    }
    base = load_config(config)
    from omnikv_runtime.models.random import SMALL_LLAMA
    from omnikv_runtime.planner import KNOWN_GEOMETRIES

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
    started = time.perf_counter()
    if args.zero:
        model = random_on_host(base, device, min_positions=args.context + 1024)
    else:
        model = random_model(base, device=device, min_positions=args.context + 1024)
    build_s = time.perf_counter() - started
    geometry = ModelGeometry.from_model(model)  # the whole model's: each rank fills its share of the KV heads
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    engine = okv.initialize(model, base)
    initialize_s = time.perf_counter() - started
    print(
        f"rank {os.environ.get('RANK', '0')}: model built in {build_s:.1f} s, initialized in {initialize_s:.1f} s",
        file=sys.stderr,
    )
    if args.selections:
        os.makedirs(args.selections, exist_ok=True)
    result: dict[str, Any] = {
        "world": world,
        "context": args.context,
        "zero": args.zero,
        "layers": geometry.num_layers,
        "build_s": round(build_s, 1),
        "initialize_s": round(initialize_s, 1),
        "gpu_memory_cap": args.gpu_memory,
        "dtype": dtype_name,
        "float32_partial_sums": args.float32_partial_sums,
        # what the GPU holds before the first step: under ZeRO-Inference, only the resident norms
        "gpu_allocated_after_initialize": torch.cuda.memory_allocated(device) if device.type == "cuda" else 0,
    }
    result["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["rows"] = []
    default_budget = base.omnikv.token_budget
    wanted = args.budgets or ("default" if args.zero else "1.0,default")
    budgets = [parse_budget(b, default_budget) for b in wanted.split(",")]
    for batch in [int(b) for b in args.batches.split(",")]:
        for budget in budgets:
            try:
                row = run(args, batch, budget, engine, engine.model, geometry, device, dtype)
            except torch.OutOfMemoryError as exc:
                if world > 1:  # the other ranks would wait in a collective
                    raise
                row = {"batch": batch, "budget": budget, "skipped": f"CUDA out of memory: {str(exc)[:120]}"}
            gather_ranks(row)
            result["rows"].append(row)
            release(device)
    if args.zero:
        gbps = pinned_gbps(device)
        weights = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.model.parameters()) * 2
        result["pinned_gbps"] = gbps
        for row in (r for r in result["rows"] if "skipped" not in r):
            selected = row["tier_bytes"]["gpu_selected"]  # the staging buffers: budget rows of every sparse layer
            row["weights_bytes_per_step"] = weights
            row["pcie_floor_ms"] = round((weights + selected) / (gbps * 1e9) * 1e3, 2) if gbps else None
    if args.hf and world == 1 and not args.zero:
        for batch in [int(b) for b in args.batches.split(",")]:
            result["rows"].append(hf_row(engine.model, batch, args.context, 8, device, dtype))
            release(device)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
    for row in result["rows"]:
        summary = {k: v for k, v in row.items() if k not in ("tokens", "selection_digests", "tier_bytes", "steps_ms")}
        print(f"rank {os.environ.get('RANK', '0')}: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
