"""Passkey retrieval grid on the bundled model: dense against OmniKV configs, in one process.

    python benchmarks/accuracy.py --config configs/default.json --lengths 1000,2000,3000 \
        --depths 0.1,0.5,0.9 --seeds 0,1 [--variants 2,8,18 2,8,16]

The grid is lengths x depths x keys (a seed draws the passkey and the filler). Dense (the same
engine with ``omnikv.enabled = false``) is the baseline; ``--config`` is the OmniKV run, and each
``--variants`` entry reruns it with other filter layers. Prints one JSON object on stdout and a
table on stderr: for each run, passkeys found, and found among the cases dense answered.
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
    parser.add_argument("--config", default="configs/default.json", help="the OmniKV config to measure")
    parser.add_argument("--variants", nargs="*", default=[], help="other filter layer sets, e.g. 2,8,18")
    parser.add_argument("--budget", help="override omnikv.token_budget: int tokens or float fraction")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    base = okv.load_config(args.config)
    if args.budget:
        base.omnikv.token_budget = float(args.budget) if "." in args.budget else int(args.budget)

    model, tokenizer = okv.load_model("smollm2-135m")
    runs = {f"config {','.join(map(str, base.omnikv.filter_layers))}": base}
    for variant in args.variants:
        config = base.model_copy(deep=True)
        config.omnikv.filter_layers = [int(x) for x in variant.split(",")]
        runs[f"filter {variant}"] = config
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
    summary = {
        "benchmark": "accuracy (passkey grid)",
        "model": "smollm2-135m (bundled GGUF, float32, CPU)",
        "lengths": lengths,
        "depths": depths,
        "seeds": seeds,
        "config": args.config,
        "omnikv": base.omnikv.model_dump(mode="json"),
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
