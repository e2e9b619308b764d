"""Decode-step benchmark: Llama-3-8B geometry (random bf16 weights), long contexts, HF baselines
and OmniKV (GPU mode, offload, offload + hot cache, offload with an FP8 host tier) in one process.

The caches are filled directly with random KV (no 128K prefill: speed does not depend on the
values), then each path runs decode steps. For each: wall ms per step (median, host included),
GPU-busy ms per step (union of kernel and copy intervals in a torch.profiler trace), bytes over
PCIe per step, the PCIe floor (bytes / pinned-copy bandwidth measured here), the HBM roofline
(bytes the step must read / device-copy bandwidth measured here), the share of the gather time
hidden behind other kernels, and kernel launches per step. Bytes are the host tier's own: for the
FP8 tier (``--modes offload_fp8``) one byte per value plus a float32 scale per head_dim values, and
``gather_gbps`` (bytes fetched per step / gather kernel time) counts those bytes.

    python benchmarks/decode.py --contexts 32768,131072 --batches 1,4 --budgets 2048,0.067 > decode.json

Prints one JSON object on stdout and a table on stderr. ``--tiny`` runs a small geometry on CPU
or GPU to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import omnikv_runtime as okv
from omnikv_runtime.decode.loop import DecodeLoop, StopSettings
from omnikv_runtime.decode.sampling import SamplingSettings
from omnikv_runtime.engine import cache_keyword
from omnikv_runtime.geometry import ModelGeometry
from omnikv_runtime.models.random import SMALL_LLAMA
from omnikv_runtime.planner import KNOWN_GEOMETRIES
from omnikv_runtime.tables import format_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # step_timing.py, also under python -P
from kv_fill import fill_prompt  # noqa: E402
from step_timing import (  # noqa: E402
    ModelStep,
    bandwidths,
    decode_steps,
    gpu_profile,
    host_syncs,
    sdpa_backends,
    sync,
)

FILTER_LAYERS = [2, 8, 18]


def model_config(tiny: bool) -> LlamaConfig:
    if tiny:
        geometry = {**SMALL_LLAMA, "num_hidden_layers": 24, "vocab_size": 1000}
    else:  # Llama-3-8B, the planner's geometry
        geometry = dict(KNOWN_GEOMETRIES["llama3-8b"])
    geometry.pop("model_type")
    geometry["max_position_embeddings"] = 1 << 21
    config = LlamaConfig(**geometry, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config._attn_implementation = "sdpa"
    return config


def random_kv(config: LlamaConfig, batch: int, tokens: int, device: torch.device, dtype: torch.dtype):
    geometry = ModelGeometry.from_hf_config(config)
    keys = torch.randn(batch, geometry.kv_heads, tokens, geometry.head_dim, device=device, dtype=dtype)
    return keys, torch.randn_like(keys)


def fill(cache, config, batch, tokens, device, dtype, chunk: int = 32768) -> None:
    """Append `tokens` random prompt tokens to every layer (HF caches via update, ours directly)."""
    if isinstance(cache, okv.OmniKVCache):
        fill_prompt(cache, tokens, chunk, lambda layer, start, count: random_kv(config, batch, count, device, dtype))
        sync(device)
        return
    for start in range(0, tokens, chunk):
        count = min(chunk, tokens - start)
        for layer in range(ModelGeometry.from_hf_config(config).num_layers):
            keys, values = random_kv(config, batch, count, device, dtype)
            if isinstance(cache, StaticCache):
                positions = torch.arange(start, start + count, device=device)
                cache.update(keys, values, layer, {"cache_position": positions})
            else:
                cache.update(keys, values, layer)
    sync(device)


def random_model(device_name: str, tiny: bool) -> tuple[torch.device, LlamaForCausalLM, LlamaConfig, torch.dtype]:
    """The benchmarks' model: random weights (bf16 on CUDA, float32 elsewhere), seed 0."""
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return device, model, config, dtype


def run_header(device: torch.device, script: str, argv: list[str] | None) -> dict[str, Any]:
    """Card, date, torch and the command, at the head of a benchmark's JSON."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
    }


def kv_bytes_per_token_layer(config: LlamaConfig, dtype: torch.dtype) -> int:
    return ModelGeometry.from_hf_config(config).kv_row_bytes(dtype.itemsize)


def fits(needed_bytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return needed_bytes < 0.92 * free


class Bench:
    """One (context, batch) cell: runs every variant and collects rows."""

    def __init__(self, args, model, config, device, dtype, links):
        self.args, self.model, self.config, self.device, self.dtype, self.links = (
            args,
            model,
            config,
            device,
            dtype,
            links,
        )
        self.weights = sum(p.numel() * p.element_size() for p in model.parameters())
        self.per_token_layer = kv_bytes_per_token_layer(config, dtype)
        self.num_layers = ModelGeometry.from_hf_config(config).num_layers
        self.keyword = cache_keyword(model)

    def roofline_ms(self, read_bytes: int) -> float | None:
        if not self.links["hbm_gbps"]:
            return None
        return round((self.weights + read_bytes) / (self.links["hbm_gbps"] * 1e9) * 1e3, 3)

    def measure(self, step, label: str = "", trace: bool = False) -> dict[str, Any]:
        """Time `step` (one decode step per call): warm-up (and graph capture), timed steps, host
        syncs of one step, and a profiled few (their Chrome trace kept with --trace-dir)."""
        steps, warmup = self.args.steps, self.args.warmup
        decode_steps(step, warmup, self.device)
        allocs = torch.cuda.memory_stats(self.device).get("num_device_alloc", 0) if self.device.type == "cuda" else 0
        if self.args.cprofile:
            import cProfile
            import pstats

            profile = cProfile.Profile()
            times = profile.runcall(decode_steps, step, steps, self.device)
            with open(os.path.join(self.args.cprofile, f"{label}.txt"), "w", encoding="utf-8") as handle:
                pstats.Stats(profile, stream=handle).sort_stats("tottime").print_stats(30)
        else:
            times = decode_steps(step, steps, self.device)
        row = {"wall_ms": round(statistics.median(times), 3), "wall_min_ms": round(min(times), 3)}
        if self.device.type == "cuda":
            allocs = torch.cuda.memory_stats(self.device).get("num_device_alloc", 0) - allocs
            row["device_allocs_per_step"] = round(allocs / steps, 2)
        row["host_syncs"] = host_syncs(step, self.device)
        trace_path = None
        if trace and self.args.trace_dir:
            os.makedirs(self.args.trace_dir, exist_ok=True)
            trace_path = os.path.join(self.args.trace_dir, f"trace_{label}.json")
        row.update(gpu_profile(step, self.args.profile_steps, self.device, trace_path))
        return row

    def steps_per_row(self) -> int:
        return self.args.warmup + self.args.steps + 1 + self.args.profile_steps

    def hf_rows(self, context: int, batch: int) -> list[dict[str, Any]]:
        with sdpa_backends(self.args.hf_sdpa_backends):
            return self._hf_rows(context, batch)

    def _hf_rows(self, context: int, batch: int) -> list[dict[str, Any]]:
        rows = []
        self.model.set_attn_implementation("sdpa")
        dense_kv = self.num_layers * batch * context * self.per_token_layer
        base = {"context": context, "batch": batch, "budget": "all"}
        for name in self.args.hf:
            row = {**base, "path": name}
            if name in ("hf_dynamic", "hf_static_compile") and not fits(dense_kv, self.device):
                rows.append({**row, "skipped": f"{dense_kv / 2**30:.0f} GiB of KV does not fit the GPU"})
                continue
            if name == "hf_static_compile" and batch not in self.args.static_batches:
                rows.append({**row, "skipped": "not run at this batch (compile time; --static-batches)"})
                continue
            if name == "hf_offload" and context > self.args.hf_offload_max_context:
                rows.append(
                    {**row, "skipped": f"not run above {self.args.hf_offload_max_context} tokens (seconds per step)"}
                )
                continue
            try:
                started = time.perf_counter()
                forward = self.model
                if name == "hf_dynamic":
                    cache = DynamicCache(config=self.config)
                elif name == "hf_offload":
                    cache = DynamicCache(config=self.config, offloading=True)
                else:
                    cache = StaticCache(config=self.config, max_cache_len=context + 64)
                    forward = torch.compile(self.model, mode="reduce-overhead")
                fill(cache, self.config, batch, context, self.device, self.dtype)
                step = ModelStep(forward, cache, batch, context, self.device, self.keyword)
                row.update(self.measure(step, f"{name}_{context}_{batch}"))
                row["roofline_ms"] = self.roofline_ms(dense_kv)
                row["setup_s"] = round(time.perf_counter() - started, 1)
                if name == "hf_offload":
                    moved = (self.num_layers - 1) * batch * context * self.per_token_layer
                    row["pcie_bytes_per_step"] = moved
                    row["pcie_bytes_note"] = "estimate: every layer's KV but one crosses to the GPU each step"
            except Exception as exc:  # a baseline that fails is reported, the others still run
                traceback.print_exc()
                row["skipped"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            finally:
                cache = forward = step = None  # the step holds the cache: all must go before the next cell
                gc.collect()
                torch.cuda.empty_cache() if self.device.type == "cuda" else None
            rows.append(row)
        return rows

    def ours_rows(self, context: int, batch: int) -> list[dict[str, Any]]:
        rows = []
        layers = self.num_layers
        for mode in self.args.modes:
            for wait in self.args.wait_layers if mode != "dense" else [1]:
                offload = "cpu" if mode.startswith("offload") else "none"
                host_dtype = "float8_e4m3fn" if mode == "offload_fp8" else "auto"
                plan = okv.LayerPlan.build(layers, FILTER_LAYERS, wait, mode != "dense")
                sparse = len(plan.sparse_layers)
                host_tier = sparse * batch * context * self.per_token_layer
                dense_tier = (layers - sparse) * batch * context * self.per_token_layer
                gpu_needed = dense_tier + (host_tier if offload == "none" else 0)
                base = {
                    "context": context,
                    "batch": batch,
                    "path": f"omnikv_{mode}"
                    + (f"_wait{wait}" if wait != 1 else "")
                    + ("_invariant" if self.args.batch_invariant else ""),
                }
                budgets = self.args.budgets if mode != "dense" else ["all"]
                if not fits(gpu_needed, self.device):
                    for budget in budgets:
                        rows.append(
                            {**base, "budget": budget, "skipped": f"{gpu_needed / 2**30:.0f} GiB of KV does not fit"}
                        )
                    continue
                hot_settings = [0, *self.args.hot_multiples] if offload == "cpu" else [0]
                config = {
                    "omnikv": {"filter_layers": FILTER_LAYERS, "wait_layers": wait, "token_budget": 2048},
                    "offload": {"device": offload, "transfer": self.args.transfer, "host_dtype": host_dtype},
                }
                if mode == "dense":
                    config["omnikv"]["enabled"] = False
                if self.args.batch_invariant:
                    config["generation"] = {"batch_invariant": True}
                engine = okv.initialize(self.model, config)
                variants = (
                    [(False, True)] + [(True, True)] * bool(self.args.eager) + [(False, False)] * self.args.unfused
                )
                runs = len(budgets) * len(hot_settings) * len(variants)
                cache = engine.new_cache(
                    reserve_tokens=context + runs * self.steps_per_row() + 64, prompt_tokens=context
                )
                started = time.perf_counter()
                fill(cache, self.config, batch, context, self.device, self.dtype)
                fill_s = round(time.perf_counter() - started, 1)
                for budget in budgets:
                    k = (
                        context
                        if budget == "all"
                        else budget
                        if isinstance(budget, int)
                        else max(64, int(budget * context + 0.999))
                    )
                    for multiple in hot_settings:
                        for eager, fused in variants:
                            row = {**base, "budget": budget, "selected": k, "fill_s": fill_s, "cuda_graph": not eager}
                            if multiple:
                                row["path"] += f"_hot{multiple}x"
                            if eager:
                                row["path"] += "_eager"
                            if not fused:
                                row["path"] += "_unfused"
                            cache.fused_layers = fused and engine.fused_layers
                            row["fused_layers"] = cache.fused_layers
                            cache.token_budget_for = lambda _context, k=k: min(k, _context)
                            cache.token_budget = min(k, cache.context_len)
                            cache.tiers.set_hot_cache_tokens(multiple * k, self.device)
                            engine.transfer.reset_stats()
                            loop = DecodeLoop(
                                self.model,
                                cache,
                                self.keyword,
                                SamplingSettings(),
                                StopSettings(),
                                max_new_tokens=self.steps_per_row() + 1,
                                use_graph=self.device.type == "cuda" and not eager,
                            )
                            loop.start_after_fill(batch, self.device)
                            label = f"{row['path']}_{context}_{batch}_{budget}"
                            first_cell = (context, batch) == (self.args.contexts[0], self.args.batches[0])
                            trace = first_cell and not eager and row["path"] in self.args.trace_paths
                            row.update(self.measure(loop.run_step, label, trace=trace))
                            row["capture_ms"] = round(loop.times.capture * 1e3, 1)
                            steps = self.steps_per_row()
                            fetched = engine.transfer.stats.bytes_fetched + cache.hot_counters()["hot_bytes_fetched"]
                            written = engine.transfer.stats.bytes_written
                            row["pcie_bytes_per_step"] = int((fetched + written) / steps) if offload == "cpu" else 0
                            row["bytes_fetched_per_step"] = int(fetched / steps)
                            if offload == "cpu" and row.get("gather_ms"):
                                row["gather_gbps"] = round(fetched / steps / (row["gather_ms"] * 1e-3) / 1e9, 1)
                            if offload == "cpu" and self.links["pcie_gbps"]:
                                row["pcie_floor_ms"] = round(
                                    row["pcie_bytes_per_step"] / (self.links["pcie_gbps"] * 1e9) * 1e3, 3
                                )
                            read = dense_tier + sparse * batch * min(k, context) * self.per_token_layer
                            row["roofline_ms"] = self.roofline_ms(read)
                            if multiple:
                                hot = cache.hot_counters()
                                row["hot_hit_rate"] = round(
                                    hot["hot_hits"] / max(1, hot["hot_hits"] + hot["hot_misses"]), 3
                                )
                            if row["roofline_ms"]:
                                row["vs_roofline"] = round(row["wall_ms"] / row["roofline_ms"], 3)
                            rows.append(row)
                            del loop
                del cache, engine
                gc.collect()
                if hasattr(torch._C, "_host_emptyCache"):  # hand cached pinned blocks back to the OS
                    torch._C._host_emptyCache()
                torch.cuda.empty_cache() if self.device.type == "cuda" else None
        return rows


def check_offload(rows: list[dict[str, Any]]) -> None:
    """Offload step within 1.15x of max(PCIe floor, the GPU-mode step) of the same cell; ratios to HF."""
    gpu = {  # the GPU-mode step of each cell, with and without generation.batch_invariant
        (r["context"], r["batch"], r["budget"], r["path"].endswith("_invariant")): r
        for r in rows
        if r["path"] in ("omnikv_gpu", "omnikv_gpu_invariant") and "wall_ms" in r
    }
    hf = {(r["context"], r["batch"]): r for r in rows if r["path"] == "hf_dynamic" and "wall_ms" in r}
    for row in rows:
        reference = hf.get((row["context"], row["batch"]))
        if row["path"].startswith("omnikv") and "wall_ms" in row and reference:
            row["speedup_vs_hf"] = round(reference["wall_ms"] / row["wall_ms"], 2)
    model_dtype_tier = {
        (r["context"], r["batch"], r["budget"], r["path"]): r for r in rows if "pcie_bytes_per_step" in r
    }
    for row in rows:
        key = (row["context"], row["batch"], row.get("budget"), row["path"].replace("_fp8", ""))  # failed: no budget
        twin = model_dtype_tier.get(key)
        if "_fp8" in row["path"] and "pcie_bytes_per_step" in row and twin and twin["pcie_bytes_per_step"]:
            row["pcie_bytes_vs_model_dtype_tier"] = round(row["pcie_bytes_per_step"] / twin["pcie_bytes_per_step"], 3)
    for row in rows:
        if row["path"].startswith("omnikv_offload") and "wall_ms" in row:
            reference = gpu.get((row["context"], row["batch"], row["budget"], row["path"].endswith("_invariant")))
            bound = max(row.get("pcie_floor_ms", 0.0), reference["wall_ms"] if reference else 0.0)
            if bound:
                row["vs_bound"] = round(row["wall_ms"] / bound, 3)


def table(rows: list[dict[str, Any]]) -> str:
    columns = [
        "context",
        "batch",
        "budget",
        "path",
        "wall_ms",
        "gpu_busy_ms",
        "kernels_per_step",
        "pcie_bytes_per_step",
        "pcie_floor_ms",
        "roofline_ms",
        "gather_ms",
        "gather_gbps",
        "pcie_bytes_vs_model_dtype_tier",
        "gather_hidden_share",
        "hot_hit_rate",
        "vs_bound",
        "vs_roofline",
        "speedup_vs_hf",
    ]
    # a skipped row says why in its first measured column
    rows = [{**row, "wall_ms": f"skipped: {row['skipped']}"} if "skipped" in row else row for row in rows]
    return format_table(rows, [(column, column, "") for column in columns], markdown=True)


def parse_budget(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--budgets", default="2048,0.067")
    parser.add_argument(
        "--hf", default="hf_dynamic", help="HF baselines: hf_dynamic, hf_static_compile, hf_offload ('' for none)"
    )
    parser.add_argument("--static-batches", default="1", help="batches at which StaticCache + torch.compile runs")
    parser.add_argument("--hf-offload-max-context", type=int, default=32768)
    parser.add_argument(
        "--modes",
        default="dense,gpu,offload",
        help="our paths: dense (OmniKV off: the runtime's own dense step), gpu (offload none), offload, "
        "offload_fp8 (offload with offload.host_dtype = float8_e4m3fn)",
    )
    parser.add_argument("--eager", action="store_true", help="also time each of our paths without a CUDA graph")
    parser.add_argument(
        "--unfused", action="store_true", help="also time each of our paths with transformers' own decoder layers"
    )
    parser.add_argument("--trace-dir", help="keep Chrome traces of the profiled steps of the first cell here")
    parser.add_argument("--trace-paths", default="omnikv_gpu,omnikv_offload", help="paths whose trace is kept")
    parser.add_argument("--wait-layers", default="1", help="wait layers after each filter layer (a list: one row each)")
    parser.add_argument("--hot-multiples", default="2", help="hot cache sizes as multiples of the budget")
    parser.add_argument("--transfer", default="auto")
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        help="our paths with generation.batch_invariant (decode projections through the batch-invariant linear)",
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small geometry, to check the script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the JSON here after every cell")
    parser.add_argument(
        "--hf-sdpa-backends",
        default="flash,efficient,math",
        help="SDPA backends for the HF paths ('' for torch's choice, which includes cuDNN); OmniKV picks its own",
    )
    parser.add_argument("--cprofile", help="folder for a cProfile of each path's timed steps (Python hot spots)")
    args = parser.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.budgets = [parse_budget(x) for x in args.budgets.split(",")]
    args.hf = [x for x in args.hf.split(",") if x]
    args.static_batches = [int(x) for x in args.static_batches.split(",") if x]
    args.modes = [x for x in args.modes.split(",") if x]
    args.hot_multiples = [int(x) for x in args.hot_multiples.split(",") if x]
    args.wait_layers = [int(x) for x in args.wait_layers.split(",") if x]
    args.trace_paths = args.trace_paths.split(",")

    device, model, config, dtype = random_model(args.device, args.tiny)
    links = bandwidths(device)
    result: dict[str, Any] = {
        **run_header(device, "decode.py", argv),
        "geometry": "tiny" if args.tiny else "Llama-3-8B (random bf16 weights)",
        "filled": "caches filled directly with random KV, no prefill",
        "filter_layers": FILTER_LAYERS,
        **links,
        "rows": [],
    }
    bench = Bench(args, model, config, device, dtype, links)
    for context in args.contexts:
        for batch in args.batches:
            rows = bench.hf_rows(context, batch)
            try:
                rows += bench.ours_rows(context, batch)
            except Exception as exc:
                traceback.print_exc()
                rows.append(
                    {"context": context, "batch": batch, "path": "omnikv", "skipped": f"{type(exc).__name__}: {exc}"}
                )
            result["rows"].extend(rows)
            check_offload(result["rows"])
            print(table(rows), file=sys.stderr, flush=True)
            if args.out:
                with open(args.out, "w", encoding="utf-8") as handle:
                    json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))
    print(table(result["rows"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
