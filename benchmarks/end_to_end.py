"""End-to-end generation through the public API, against transformers' ``generate`` in the same process.

Llama-3-8B geometry with random bf16 weights, a random prompt of each context length, batch 1.
For each path, ``generate`` runs once to warm up (kernels compiled; for the engine, the decode step
captured in a CUDA graph that later calls of the same shape replay), then for 1 and for ``1 + N``
new tokens; the per-step time is ``(t(1 + N) - t(1)) / N`` and the prefill time is ``t(1)`` (the
prompt plus the first token). The first call's time is reported too.
Paths: transformers' ``model.generate`` with its default cache and attention (the baseline), and
``omnikv_runtime.initialize(model, config).generate`` in GPU mode and offload mode.

    python benchmarks/end_to_end.py --contexts 32768,131072 --new-tokens 32

Prints one JSON object on stdout and a table on stderr. ``--tiny`` checks the script on a small
geometry (CPU or GPU).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
from typing import Any

import torch

import omnikv_runtime as okv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode.py, also under python -P
from decode import FILTER_LAYERS, random_model, run_header  # noqa: E402


def timed(device: torch.device, run) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(device: torch.device, generate, new_tokens: int) -> dict[str, Any]:
    """A first call (kernels compiled, the decode step captured), then the timed ones."""
    cold = timed(device, lambda: generate(1 + new_tokens))
    first = timed(device, lambda: generate(1))
    longer = timed(device, lambda: generate(1 + new_tokens))
    return {
        "prefill_s": round(first, 3),
        "step_ms": round((longer - first) / new_tokens * 1e3, 3),
        "t_1_s": round(first, 3),
        f"t_{1 + new_tokens}_s": round(longer, 3),
        f"first_call_t_{1 + new_tokens}_s": round(cold, 3),
    }


def hf_generate(model, ids: torch.Tensor, tokens: int) -> None:
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def omnikv_generate(engine, ids: torch.Tensor, tokens: int) -> None:
    engine.generate(ids, max_new_tokens=tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", default="gpu,offload")
    parser.add_argument("--chunk-size", type=int, default=None, help="prefill.chunk_size (default: the config's)")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device, model, config, _ = random_model(args.device, args.tiny)
    model.generation_config.pad_token_id = 0
    result: dict[str, Any] = {
        **run_header(device, "end_to_end.py", argv),
        "geometry": "tiny" if args.tiny else "Llama-3-8B (random bf16 weights)",
        "rows": [],
    }
    for context in [int(x) for x in args.contexts.split(",")]:
        generator = torch.Generator().manual_seed(context)
        ids = torch.randint(100, config.vocab_size, (1, context), generator=generator).to(device)

        model.set_attn_implementation("sdpa")
        baseline = functools.partial(hf_generate, model, ids)
        rows = [{"context": context, "path": "hf_generate", **measure(device, baseline, args.new_tokens)}]
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        for mode in args.modes.split(","):
            omnikv = {"filter_layers": FILTER_LAYERS, "wait_layers": 1, "token_budget": args.budget}
            engine_config: dict[str, Any] = {
                "omnikv": omnikv,
                "offload": {"device": "cpu" if mode == "offload" else "none"},
            }
            if args.chunk_size:
                engine_config["prefill"] = {"chunk_size": args.chunk_size}
            engine = okv.initialize(model, engine_config)
            row: dict[str, Any] = {"context": context, "path": f"omnikv_{mode}"}
            row.update(measure(device, functools.partial(omnikv_generate, engine, ids), args.new_tokens))
            stats = engine.stats()
            row.update(
                cuda_graph=stats.get("cuda_graph"),
                capture_ms=round(stats.get("graph_capture_seconds", 0.0) * 1e3, 1),
                engine_prefill_s=round(stats.get("prefill_seconds", 0.0), 3),
                engine_step_ms=round(stats["decode_seconds"] / max(1, stats["decode_steps"]) * 1e3, 3),
            )
            row["prefill_vs_hf"] = round(row["prefill_s"] / rows[0]["prefill_s"], 3)
            row["step_speedup_vs_hf"] = round(rows[0]["step_ms"] / row["step_ms"], 2)
            rows.append(row)
            model.set_attn_implementation("sdpa")  # hand the model back as the baseline found it
            del engine
            gc.collect()
            if hasattr(torch._C, "_host_emptyCache"):
                torch._C._host_emptyCache()
            torch.cuda.empty_cache() if device.type == "cuda" else None
        result["rows"].extend(rows)
        print(json.dumps(rows), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))
    columns = ["context", "path", "prefill_s", "step_ms", "prefill_vs_hf", "step_speedup_vs_hf", "capture_ms"]
    print(" | ".join(columns), file=sys.stderr)
    for row in result["rows"]:
        print(" | ".join(str(row.get(c, "")) for c in columns), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
