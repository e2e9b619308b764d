"""Multi-needle retrieval on the bundled model: dense, OmniKV and the baseline policies, in one process.

    python benchmarks/policies.py --config configs/default.json --lengths 1000,2000,3000 --needles 2,4 \
        --seeds 0 [--policies last,streaming_llm,h2o,snapkv,quest,infllm] [--plot docs/policies_grid.png]

Every policy runs on equal terms: the config's filter layers, wait layers and token budget, only
``omnikv.selector`` differs. Dense (``omnikv.enabled = false``, same engine) is the baseline. A
case is a prompt of `length` tokens with `needles` passkeys in coloured boxes, one of them asked for
(``omnikv_runtime.eval.passkey.build_multi_needle_prompt``). Prints one JSON object on stdout and a table
on stderr; ``--plot`` draws a bar chart (needs matplotlib: ``pip install omnikv-runtime[plot]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import omnikv_runtime as okv
from omnikv_runtime.eval.passkey import build_multi_needle_prompt, passkey_found
from omnikv_runtime.tables import format_table

DEFAULT_POLICIES = "last,streaming_llm,h2o,snapkv,quest,infllm"


def run_cases(engine, tokenizer, cases: list[tuple[int, int, int]], max_new_tokens: int) -> list[dict]:
    rows = []
    for length, needles, seed in cases:
        text, key, keys = build_multi_needle_prompt(tokenizer, length, needles, seed=seed)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        out = engine.generate(ids, max_new_tokens=max_new_tokens)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        stats = engine.stats()
        dropped = stats.get("dropped_tokens", {})
        rows.append(
            {
                "length": length,
                "needles": needles,
                "seed": seed,
                "prompt_tokens": ids.shape[1],
                "correct": passkey_found(answer, key),
                "distractor": any(passkey_found(answer, other) for other in keys if other != key),
                "answer": answer.strip()[:60],
                "dropped_tokens": max(dropped.values(), default=0),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
        print(f"  {length} tokens, {needles} needles, seed {seed}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def plot(summary: dict, path: str) -> None:
    """Bar chart: passkeys found per variant, one bar group per prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["results"])
    lengths = summary["lengths"]
    width = 0.8 / len(lengths)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names)), 3.6))
    for i, length in enumerate(lengths):
        found = [sum(r["correct"] for r in summary["results"][n]["rows"] if r["length"] == length) for n in names]
        cases = sum(1 for r in summary["results"][names[0]]["rows"] if r["length"] == length)
        xs = [j + (i - (len(lengths) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, found, width, label=f"{length} tokens ({cases} cases)")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("passkeys found")
    ax.set_title(f"Multi-needle retrieval, SmolLM2-135M, budget {summary['omnikv']['token_budget']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.json", help="filter layers, budget: shared by all")
    parser.add_argument("--lengths", default="1000,2000,3000")
    parser.add_argument("--needles", default="2,4")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="selector types (names or module:Class)")
    parser.add_argument("--budget", help="override omnikv.token_budget: int tokens or float fraction")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--plot", help="write a bar chart PNG here")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    cases = [
        (length, int(n), int(seed))
        for length in lengths
        for n in args.needles.split(",")
        for seed in args.seeds.split(",")
    ]
    base = okv.load_config(args.config)
    if args.budget:
        base.omnikv.token_budget = float(args.budget) if "." in args.budget else int(args.budget)
    model, tokenizer = okv.load_model("smollm2-135m")
    configs = {}
    for policy in args.policies.split(","):
        config = base.model_copy(deep=True)
        config.omnikv.selector = {"type": policy}
        configs[policy] = config
    # every engine is built before anything runs, so a bad policy name fails in seconds
    engines = {"dense": okv.initialize(model, {"omnikv": {"enabled": False}}, tokenizer=tokenizer)}
    engines.update({name: okv.initialize(model, config, tokenizer=tokenizer) for name, config in configs.items()})
    results: dict[str, dict] = {}
    summary = {
        "benchmark": "policies (multi-needle grid)",
        "model": "smollm2-135m (bundled GGUF, float32, CPU)",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "torch": torch.__version__,
        "lengths": lengths,
        "needles": [int(n) for n in args.needles.split(",")],
        "seeds": [int(s) for s in args.seeds.split(",")],
        "config": args.config,
        "omnikv": base.omnikv.model_dump(mode="json"),
        "results": results,
    }
    for name, engine in engines.items():
        rows = run_cases(engine, tokenizer, cases, args.max_new_tokens)
        results[name] = {
            "lossless": name == "dense" or engine.policy.lossless,
            "rows": rows,
            "correct": sum(row["correct"] for row in rows),
            "distractor_answers": sum(row["distractor"] for row in rows),
            "cases": len(rows),
            "seconds": round(sum(row["seconds"] for row in rows), 1),
        }
        print(f"{name}: {results[name]['correct']}/{len(rows)}", file=sys.stderr, flush=True)
        if args.json_out:  # partial results survive an interrupted run
            Path(args.json_out).write_text(json.dumps(summary) + "\n", encoding="utf-8")
    dense_rows = results["dense"]["rows"]
    for result in results.values():
        result["correct_where_dense_correct"] = sum(
            row["correct"] for row, ref in zip(result["rows"], dense_rows) if ref["correct"]
        )
    text = json.dumps(summary)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    if args.plot:
        plot(summary, args.plot)
    columns = [("policy", "policy", ""), ("found", "correct", ""), ("cases", "cases", "")]
    columns += [("dense found", "correct_where_dense_correct", ""), ("distractor", "distractor_answers", "")]
    columns += [("seconds", "seconds", "")]
    rows = [{"policy": name, **result} for name, result in results.items()]
    print("\n" + format_table(rows, columns), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
