"""Passkey retrieval grid on the bundled model: dense against OmniKV configs, in one process.

    python benchmarks/accuracy.py --config configs/default.json --lengths 1000,2000,3000 \
        --depths 0.1,0.5,0.9 --seeds 0,1 [--variants 2,8,18 2,8,16] [--selectors uniform,exp] \
        [--host-dtypes auto,float8_e4m3fn] [--model-dtype bfloat16] [--logit-steps 256]

The grid is lengths x depths x keys (a seed draws the passkey and the filler). Dense (the same
engine with ``omnikv.enabled = false``) is the baseline; ``--config`` is the OmniKV run, each
``--variants`` entry reruns it with other filter layers, each ``--selectors`` entry with another
selection policy; ``--host-dtypes`` runs each of them with
each host-tier dtype (``auto``: the model's; ``float8_e4m3fn``: the FP8 tier). Prints one JSON
object on stdout and a table on stderr: for each run, passkeys found, and found among the cases
dense answered (and, for an FP8 run, among the cases its ``auto`` twin answered).

``--logit-steps N`` adds, at budget 1.0 for each host dtype: the largest logit difference against
dense over ``N`` decode steps fed dense's own greedy tokens (so both see the same sequence), and
how many of ``N`` free-running greedy tokens differ from dense's (with the first that differs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # logit_drift.py, also under python -P
from logit_drift import logit_drift  # noqa: E402

import omnikv_runtime as okv  # noqa: E402
from omnikv_runtime.eval.passkey import build_passkey_prompt, passkey_found  # noqa: E402
from omnikv_runtime.tables import format_table


def run_grid(engine, tokenizer, lengths, depths, seeds, max_new_tokens: int) -> list[dict]:
    rows = []
    for length in lengths:
        for depth in depths:
            for seed in seeds:
                text, key = build_passkey_prompt(tokenizer, length, depth, seed=seed)
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
                start = time.perf_counter()
                out = engine.generate(ids, max_new_tokens=max_new_tokens)
                answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                rows.append(
                    {
                        "length": length,
                        "depth": depth,
                        "seed": seed,
                        "prompt_tokens": ids.shape[1],
                        "correct": passkey_found(answer, key),
                        "answer": answer.strip()[:40],
                        "seconds": round(time.perf_counter() - start, 2),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1000,2000,3000")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--config", default="configs/default.json", help="the OmniKV config to measure")
    parser.add_argument("--variants", nargs="*", default=[], help="other filter layer sets, e.g. 2,8,18")
    parser.add_argument("--selectors", default="", help="selector types to rerun the config with, e.g. uniform,exp")
    parser.add_argument("--budget", help="override omnikv.token_budget: int tokens or float fraction")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--host-dtypes", default="auto", help="host-tier dtypes to run each config with")
    parser.add_argument("--model-dtype", default="float32", help="the bundled model's dtype (float32, bfloat16)")
    parser.add_argument("--logit-steps", type=int, default=0, help="budget-1.0 logit/token drift over N steps")
    parser.add_argument("--logit-length", type=int, default=3000, help="prompt tokens of the drift run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",") if x]  # '' skips the grid (only --logit-steps)
    depths = [float(x) for x in args.depths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    base = okv.load_config(args.config)
    if args.budget:
        base.omnikv.token_budget = float(args.budget) if "." in args.budget else int(args.budget)

    model, tokenizer = okv.load_model("smollm2-135m", dtype=args.model_dtype)
    host_dtypes = [x for x in args.host_dtypes.split(",") if x]
    configs = {f"config {','.join(map(str, base.omnikv.filter_layers))}": base}
    for variant in args.variants:
        config = base.model_copy(deep=True)
        config.omnikv.filter_layers = [int(x) for x in variant.split(",")]
        configs[f"filter {variant}"] = config
    for selector in [x for x in args.selectors.split(",") if x]:
        config = base.model_copy(deep=True)
        config.omnikv.selector = {"type": selector}
        configs[f"selector {selector}"] = config
    runs = {}
    for name, config in configs.items():
        for host_dtype in host_dtypes:
            run = config.model_copy(deep=True)
            run.offload.host_dtype = host_dtype
            runs[name if host_dtype == "auto" else f"{name} {host_dtype}"] = run
    # every engine is built before anything runs, so a bad variant fails in seconds, not after the grid
    engines = {name: okv.initialize(model, config, tokenizer=tokenizer) for name, config in runs.items()}
    dense = okv.initialize(model, {"omnikv": {"enabled": False}}, tokenizer=tokenizer)
    dense_rows = run_grid(dense, tokenizer, lengths, depths, seeds, args.max_new_tokens)
    results: dict[str, dict] = {"dense": {"rows": dense_rows}}
    for name, engine in engines.items():
        results[name] = {"rows": run_grid(engine, tokenizer, lengths, depths, seeds, args.max_new_tokens)}
    for result in results.values():
        rows = result["rows"]
        result["correct"] = sum(row["correct"] for row in rows)
        result["correct_where_dense_correct"] = sum(
            row["correct"] for row, ref in zip(rows, dense_rows) if ref["correct"]
        )
        result["cases"] = len(rows)
        result["seconds"] = round(sum(row["seconds"] for row in rows), 1)
    for name, config in runs.items():
        twin = name.removesuffix(f" {config.offload.host_dtype}")
        if config.offload.host_dtype != "auto" and twin in results:
            twin_rows = results[twin]["rows"]
            found = [row["correct"] for row, ref in zip(results[name]["rows"], twin_rows) if ref["correct"]]
            results[name]["correct_where_auto_tier_correct"] = f"{sum(found)}/{len(found)}"
            results[name]["same_answers_as_auto_tier"] = sum(
                row["answer"] == ref["answer"] for row, ref in zip(results[name]["rows"], twin_rows)
            )
    summary = {
        "benchmark": "accuracy (passkey grid)",
        "model": f"smollm2-135m (bundled GGUF, {args.model_dtype}, CPU)",
        "host_dtypes": host_dtypes,
        "lengths": lengths,
        "depths": depths,
        "seeds": seeds,
        "config": args.config,
        "omnikv": base.omnikv.model_dump(mode="json"),
        "dense_correct": results["dense"]["correct"],
        "results": results,
    }
    if args.logit_steps:
        summary["logit_drift"] = logit_drift(
            model, tokenizer, base, host_dtypes, args.logit_length, args.logit_steps, dense=dense
        )
    print(json.dumps(summary))
    columns = [("variant", "variant", ""), ("found", "correct", ""), ("cases", "cases", "")]
    columns += [("where dense found", "correct_where_dense_correct", ""), ("seconds", "seconds", "")]
    rows = [{"variant": name, **result} for name, result in results.items()]
    print("\n" + format_table(rows, columns), file=sys.stderr)
    for host_dtype, drift in summary.get("logit_drift", {}).get("runs", {}).items():
        print(
            f"budget 1.0, host tier {host_dtype}: max |logit - dense| {drift['max_abs_logit_diff']:.4g} "
            f"(logits up to {drift['max_abs_logit']:.3g}); greedy tokens differing from dense in "
            f"{drift['steps']} steps: {drift['tokens_differing']} (first at step {drift['first_difference']})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
