"""The planner's GPU bytes per rank against the peaks ``benchmarks/tensor_parallel.py`` measured.

    python benchmarks/tp_plan_check.py --plans plan_*.json --runs tp1.json tp2.json tp4.json --out check.json

``--plans``: ``omnikv plan --json`` outputs (one context, batch and ``--tp-size`` each). ``--runs``: the
benchmark's JSON (rank 0's, with every rank's peak). For every row of a run whose context, batch and number
of ranks match a plan: the planned decode-only bytes (weights, the GPU's KV tiers and the decode step's
activations) against the largest rank's peak while decoding, and, when the run prefilled (``--prefill``),
the planned figure with a prefill against the largest rank's peak during it; each as measured / planned.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from omnikv_runtime.tables import format_table

GPU_TIERS = ("gpu_dense", "gpu_selected", "gpu_tail", "gpu_hot", "gpu_hot_state")


def planned(plan: dict[str, Any]) -> dict[str, int]:
    section = plan["omnikv"]
    decode_only = section["weights"] + sum(section["tiers"][name] for name in GPU_TIERS)
    decode_only += section["activations"]["decode"]
    return {"decode": decode_only, "prefill": section["gpu"]}


def check(plans: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(p["context"], p["batch"], p["tp_size"]): planned(p) for p in plans}
    rows = []
    for run in runs:
        for row in run["rows"]:
            key = (run["context"], row.get("batch"), run["world"])
            if key not in by_key or "skipped" in row or "gpu_peak_bytes" not in row:
                continue
            plan = by_key[key]
            decode = max(row.get("gpu_peak_bytes_per_rank") or [row["gpu_peak_bytes"]])
            entry = {
                "context": key[0],
                "batch": key[1],
                "tp": key[2],
                "budget": row.get("budget"),
                "planned_decode_gb": round(plan["decode"] / 1e9, 2),
                "measured_decode_gb": round(decode / 1e9, 2),
                "decode_ratio": round(decode / plan["decode"], 4),
            }
            if row.get("prefill_tokens"):
                peak = max(row.get("gpu_peak_prefill_bytes_per_rank") or [row["gpu_peak_prefill_bytes"]])
                entry.update(
                    planned_prefill_gb=round(plan["prefill"] / 1e9, 2),
                    measured_prefill_gb=round(peak / 1e9, 2),
                    prefill_ratio=round(peak / plan["prefill"], 4),
                )
            rows.append(entry)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="+", required=True)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    plans = [json.load(open(path, encoding="utf-8")) for path in args.plans]
    runs = [json.load(open(path, encoding="utf-8")) for path in args.runs]
    rows = check(plans, runs)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    columns = [
        ("context", "context", ""),
        ("batch", "batch", ""),
        ("GPUs", "tp", ""),
        ("budget", "budget", ""),
        ("planned GB", "planned_decode_gb", ".2f"),
        ("measured GB", "measured_decode_gb", ".2f"),
        ("measured/planned", "decode_ratio", ".4f"),
        ("planned w/ prefill", "planned_prefill_gb", ".2f"),
        ("measured prefill", "measured_prefill_gb", ".2f"),
        ("ratio", "prefill_ratio", ".4f"),
    ]
    print(format_table(rows, columns), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
