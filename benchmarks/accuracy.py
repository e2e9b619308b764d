"""Passkey retrieval grid on the bundled model: dense against OmniKV variants, in one process.

    python benchmarks/accuracy.py --lengths 1000,2000,3000 --depths 0.1,0.5,0.9 --seeds 0,1 \
        --variants "2,8,18" "2,8,16" --budget 0.067

Each variant is a set of filter layers (one wait layer unless ``--wait-layers``); dense (the same
engine with ``omnikv.enabled = false``) is the baseline. Prints one JSON object and a table: for
each variant, passkeys found out of the cases, and how many of the cases dense answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import omnikv_runtime as okv
from omnikv_runtime.passkey import build_passkey_prompt, passkey_found


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
    parser.add_argument("--variants", nargs="+", default=["2,8,18"], help="filter layer sets, e.g. 2,8,18")
    parser.add_argument("--budget", default="0.067", help="token budget: int tokens or float fraction")
    parser.add_argument("--wait-layers", type=int, default=1)
    parser.add_argument("--selector", default="last")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    budget = float(args.budget) if "." in args.budget else int(args.budget)

    model, tokenizer = okv.load_model("smollm2-135m")
    results: dict[str, dict] = {}
    dense = okv.initialize(model, {"omnikv": {"enabled": False}}, tokenizer=tokenizer)
    dense_rows = run_grid(dense, tokenizer, lengths, depths, seeds, args.max_new_tokens)
    results["dense"] = {"rows": dense_rows}
    for variant in args.variants:
        layers = [int(x) for x in variant.split(",")]
        config = {
            "omnikv": {
                "filter_layers": layers,
                "wait_layers": args.wait_layers,
                "token_budget": budget,
                "selector": {"type": args.selector},
            }
        }
        engine = okv.initialize(model, config, tokenizer=tokenizer)
        results[f"filter {variant}"] = {
            "rows": run_grid(engine, tokenizer, lengths, depths, seeds, args.max_new_tokens)
        }
    for result in results.values():
        rows = result["rows"]
        result["correct"] = sum(row["correct"] for row in rows)
        result["correct_where_dense_correct"] = sum(
            row["correct"] for row, ref in zip(rows, dense_rows) if ref["correct"]
        )
        result["cases"] = len(rows)
        result["seconds"] = round(sum(row["seconds"] for row in rows), 1)
    summary = {
        "benchmark": "accuracy (passkey grid)",
        "model": "smollm2-135m (bundled GGUF, float32, CPU)",
        "lengths": lengths,
        "depths": depths,
        "seeds": seeds,
        "budget": budget,
        "wait_layers": args.wait_layers,
        "selector": args.selector,
        "dense_correct": results["dense"]["correct"],
        "results": results,
    }
    print(json.dumps(summary))
    print(f"\n{'variant':<22}{'found':>8}{'cases':>8}{'where dense found':>20}{'seconds':>10}", file=sys.stderr)
    for name, result in results.items():
        print(
            f"{name:<22}{result['correct']:>8}{result['cases']:>8}"
            f"{result['correct_where_dense_correct']:>20}{result['seconds']:>10}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
