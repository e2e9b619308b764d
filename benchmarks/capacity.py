"""Capacity: the memory planner against what the engine really allocates, and decoding at the longest context.

    python benchmarks/capacity.py [--config llama3_8b] [--contexts 32768,131072] [--batches 1,4]
        [--host-dtypes auto,float8_e4m3fn] [--decode-steps 4] [--gpu-memory 80GB] [--host-memory 110GiB]
        [--omnikv-context auto|N|0] [--cuda-graph] [--headroom 0.05] [--device cuda] [--tiny] [--out capacity.json]

(a) For each context and batch the planner says fits, OmniKV (once per host-tier dtype) and dense:
build the engine on a random-weight model of the config's geometry (Llama-3-8B for ``llama3_8b``),
fill the cache directly (random K/V written chunk by chunk through the cache's own layers and host
arenas, as a chunked prefill would leave them: generated on the GPU and written straight into the
pinned tier, no prefill forward and no host-side copy), decode ``--decode-steps`` tokens, and
compare ``torch.cuda.max_memory_allocated`` (decode peak), ``memory_allocated`` (steady state) and
the host bytes pinned (registered with CUDA, counted exactly) with the planner's figures (ratio
measured / planned), and the cache's ``tier_bytes`` with the planned tiers (exact). Each run frees
its cache before the next: the pinned bytes after freeing are reported (0 when all went back).

(b) The planner's longest context (cache filled directly, decode only) for dense and for OmniKV with
each host-tier dtype on ``--gpu-memory`` (default: this card) with ``--host-memory`` (default: the
host memory available once the model is built), then a run per host dtype that fills OmniKV's cache
to that figure (or ``--omnikv-context N``; 0 skips them) and decodes. Also printed: the planner's
figures for one 80 GB card with 512 GB of host memory (no run).

Prints one JSON object and a table. ``--device cpu --tiny`` runs the same logic on a tiny model.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from typing import Any

import psutil
import torch

from omnikv_runtime.config import load_config
from omnikv_runtime.decode.loop import DecodeLoop, StopSettings
from omnikv_runtime.decode.sampling import SamplingSettings
from omnikv_runtime.engine import Engine, cache_keyword
from omnikv_runtime.layout import reserve_tokens
from omnikv_runtime.models.random import TINY_LLAMA, random_model
from omnikv_runtime.planner import ModelGeometry, hf_config_dict, parse_bytes, plan_memory
from omnikv_runtime.planner.fit import DEFAULT_HEADROOM, dense_twin, fits, longest_context
from omnikv_runtime.tables import format_table
from omnikv_runtime.transfer import pinned_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kv_fill.py, also under python -P
from kv_fill import fill_prompt  # noqa: E402

TINY_CONFIG = {
    "model": {"dtype": "float32"},
    "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 8},
    "prefill": {"chunk_size": 16},
}
TIERS = ("gpu_dense", "gpu_selected", "gpu_tail", "gpu_hot", "host", "host_allocated")


def fill_cache(cache: Any, tokens: int, batch: int, kv_heads: int, head_dim: int, dtype, device, chunk: int) -> None:
    """Write ``tokens`` random tokens of K/V into every layer of ``cache``, chunk by chunk in a prefill's
    order (dense layers' buffers, sparse layers' host arenas). No forward."""

    def layer_kv(layer: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.randn(batch, kv_heads, count, head_dim, dtype=dtype, device=device)
        return keys, torch.randn_like(keys)

    fill_prompt(cache, tokens, chunk, layer_kv)


def _variant_name(config: Any) -> str:
    if not config.omnikv.enabled:
        return "dense"
    dtype = config.offload.host_dtype
    return "omnikv" if dtype == "auto" else f"omnikv_{dtype}"


def _release(device: torch.device) -> None:
    gc.collect()  # caches and engines hold reference cycles: they must be gone before the next run
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _decode(model, engine: Engine, cache: Any, batch: int, steps: int, device: torch.device, graph: bool):
    """``steps`` decode steps (eager, or through the engine's decode loop with a CUDA graph): ms per step."""
    cuda = device.type == "cuda"
    times = []
    if graph:
        loop = DecodeLoop(
            model, cache, cache_keyword(model), SamplingSettings(), StopSettings(), steps + 1, use_graph=cuda
        )
        loop.start_after_fill(batch, device)
        step = loop.run_step
    else:
        token = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)

        def step() -> None:
            nonlocal token
            logits = model(input_ids=token, **{cache_keyword(model): cache}, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)

    with torch.inference_mode():
        for _ in range(steps):
            begin = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def measure(model, config, geometry, context: int, batch: int, steps: int, device: torch.device, graph: bool = False):
    """Fill, decode ``steps`` tokens, and compare memory with the plan (cache filled: no prefill)."""
    cuda = device.type == "cuda"
    plan = plan_memory(geometry, config, context, batch, steps + 1, prefill=False)
    _release(device)
    pinned_before = pinned_bytes()
    host_available = psutil.virtual_memory().available
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    engine = Engine(model, config)
    rss_before = psutil.Process().memory_info().rss
    cache = engine.new_cache(reserve_tokens=reserve_tokens(context, steps + 1), prompt_tokens=context)
    dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    fill_cache(cache, context, batch, geometry.kv_heads, geometry.head_dim, dtype, device, config.prefill.chunk_size)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    fill_seconds = time.perf_counter() - start
    step_ms = _decode(model, engine, cache, batch, steps, device, graph)
    tiers = cache.tier_bytes()
    result: dict[str, Any] = {
        "mode": _variant_name(config),
        "host_dtype": config.offload.host_dtype if config.omnikv.enabled else None,
        "context": context,
        "batch": batch,
        "decode_steps": steps,
        "cuda_graph": graph and cuda,
        "fill_seconds": round(fill_seconds, 2),
        "decode_ms_median": round(sorted(step_ms)[len(step_ms) // 2], 2),
        "decode_ms": [round(t, 2) for t in step_ms],
        "tiers_exact": all(plan.tiers[key] == tiers[key] for key in TIERS),
        "tiers": tiers,
        "planned_tiers": {key: plan.tiers[key] for key in TIERS},
        "planned_gpu_peak": plan.gpu,
        "planned_gpu_steady": plan.gpu - max(plan.activations.values()),
        "planned_host": plan.host,
        "host_bytes_per_token": plan.host_bytes_per_token,
        "host_available_before": host_available,
        "measured_pinned": pinned_bytes() - pinned_before,
        "measured_rss_growth": psutil.Process().memory_info().rss - rss_before,
    }
    if plan.host:
        result["ratio_pinned"] = round(result["measured_pinned"] / plan.host, 6) if cuda else None
    if cuda:
        result.update(
            measured_gpu_peak=torch.cuda.max_memory_allocated(device),
            measured_gpu_steady=torch.cuda.memory_allocated(device),
            pinning_fallbacks=engine.transfer.stats.pinned_fallbacks,
        )
        result["ratio_gpu_peak"] = round(result["measured_gpu_peak"] / plan.gpu, 4)
        result["ratio_gpu_steady"] = round(result["measured_gpu_steady"] / result["planned_gpu_steady"], 4)
        ratios = [v for k, v in result.items() if k.startswith("ratio_") and v is not None]
        result["within_5_percent"] = all(abs(r - 1) <= 0.05 for r in ratios)
    del cache, engine
    _release(device)
    result["pinned_after_free"] = pinned_bytes() - pinned_before
    return result


def _gpu_memory(args: argparse.Namespace, device: torch.device) -> int:
    if args.gpu_memory:
        return parse_bytes(args.gpu_memory, "--gpu-memory")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return 80 * 10**9


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    config = load_config(TINY_CONFIG if args.tiny else args.config)
    model_config = args.tiny_config_path if args.tiny else None
    geometry = ModelGeometry.from_hf_config(hf_config_dict(config, model_config))
    steps = args.decode_steps
    longest_asked = 0 if args.omnikv_context == "auto" else int(args.omnikv_context)
    positions = max([*args.contexts, longest_asked, 1 << 22]) + steps + 1  # random weights: no trained limit
    model = random_model(config, model_config, device, min_positions=positions)
    gpu_memory = _gpu_memory(args, device)
    # what the host has once the model (and the CUDA context) exist: what the host tier may take
    host_memory = parse_bytes(args.host_memory, "--host-memory") if args.host_memory else None
    host_memory = host_memory or psutil.virtual_memory().available
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "geometry": geometry.__dict__,
        "gpu_memory": gpu_memory,
        "host_memory": host_memory,
        "host_memory_total": psutil.virtual_memory().total,
        "headroom": args.headroom,
        "filled_directly": "the cache is filled with random K/V through its own layers (no prefill forward)",
        "runs": [],
    }
    variants = {}
    for host_dtype in args.host_dtypes:
        variant = config.model_copy(deep=True)
        variant.offload.host_dtype = host_dtype
        variants[_variant_name(variant)] = variant
    variants["dense"] = dense_twin(config)
    for context in args.contexts:
        for batch in args.batches:
            for name, variant in variants.items():
                plan = plan_memory(geometry, variant, context, batch, steps + 1, prefill=False)
                if not fits(plan, gpu_memory, host_memory, args.headroom)["all"]:
                    report["runs"].append({"mode": name, "context": context, "batch": batch, "skipped": "plan: no fit"})
                    continue
                report["runs"].append(measure(model, variant, geometry, context, batch, steps, device, args.cuda_graph))
    longest = {}
    for name, variant in variants.items():
        here = longest_context(geometry, variant, 1, steps + 1, gpu_memory, host_memory, args.headroom, prefill=False)
        card = longest_context(geometry, variant, 1, steps + 1, 80 * 10**9, 512 * 10**9, prefill=False)
        with_prefill = longest_context(geometry, variant, 1, steps + 1, 80 * 10**9, 512 * 10**9)
        longest[name] = {"this_machine": here, "80GB_card_512GB_host": card, "80GB_card_with_prefill": with_prefill}
    report["longest_context"] = longest
    report["longest_runs"] = {}
    for name, variant in variants.items():
        if name == "dense":
            continue
        target = longest[name]["this_machine"]["context"] if args.omnikv_context == "auto" else longest_asked
        if target:
            run_ = measure(model, variant, geometry, target, 1, steps, device, args.cuda_graph)
            report["longest_runs"][name] = run_
            if args.out:  # a long run's figures are kept even if a later one fails
                write_json(report, args.out)
    return report


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(report, indent=2, default=str))


def print_table(report: dict[str, Any]) -> None:
    gb = 1e9
    print(f"\n{report['device']}, {report['date']}; cache filled directly (no prefill)")

    def giga(key: str):
        return lambda row: None if row.get(key) is None else row[key] / gb

    columns = [("mode", "mode", ""), ("context", "context", ""), ("b", "batch", "")]
    columns += [("plan GB", giga("planned_gpu_peak"), ".2f"), ("peak GB", giga("measured_gpu_peak"), ".2f")]
    columns += [("ratio", "ratio_gpu_peak", ".3f"), ("pinned GB", giga("measured_pinned"), ".2f")]
    columns += [("plan GB", giga("planned_host"), ".2f"), ("ratio", "ratio_pinned", ".4f")]
    columns += [("freed", lambda row: None if "skipped" in row else row["pinned_after_free"] == 0, "")]
    columns += [("tiers", "tiers_exact", ""), ("ms/step", "decode_ms_median", ".1f"), ("skipped", "skipped", "")]
    runs = list(report["runs"]) + list(report.get("longest_runs", {}).values())
    print(format_table(runs, columns))
    for name, figures in report["longest_context"].items():
        here, card = figures["this_machine"], figures["80GB_card_512GB_host"]
        print(
            f"longest context {name}: this machine {here['context']:,} ({here['limited_by']}); "
            f"80 GB card + 512 GB host {card['context']:,} "
            f"(with prefill: {figures['80GB_card_with_prefill']['context']:,})"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama3_8b")
    parser.add_argument("--contexts", default="32768,131072", help="part (a) contexts ('' for none)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--host-dtypes", default="auto", help="OmniKV host-tier dtypes: auto, float8_e4m3fn")
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--gpu-memory")
    parser.add_argument("--host-memory", help="host memory for the tier (default: available once the model is built)")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, help="share of each memory kept free")
    parser.add_argument("--omnikv-context", default="auto")
    parser.add_argument("--cuda-graph", action="store_true", help="decode through the engine's loop (CUDA graph)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny random llama (CPU check of the logic)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.contexts = [int(x) for x in args.contexts.split(",") if x]
    args.batches = [int(x) for x in args.batches.split(",") if x]
    args.host_dtypes = [x for x in args.host_dtypes.split(",") if x]
    args.tiny_config_path = None
    if args.tiny:
        import tempfile
        from pathlib import Path

        path = Path(tempfile.mkdtemp()) / "config.json"
        path.write_text(json.dumps(TINY_LLAMA))
        args.tiny_config_path = str(path)
    report = run(args)
    print(json.dumps(report, indent=2, default=str))
    if args.out:
        write_json(report, args.out)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
