"""Compare two ``benchmarks/tensor_parallel.py`` runs (one GPU against N): tokens and selections.

    python benchmarks/tp_compare.py tp1.json tp2.json --selections SEL_DIR --out compare.json

Per batch and budget: the greedy tokens (equal, or the first step where a row differs), the
selected indices per filter layer and step (equal digests), and with ``--selections`` (the folder
both runs saved their indices in) the share of the reference's selected tokens that the other run
also selected, per filter layer, over the steps before any row's tokens differ and over all steps.
Rank 0 against rank 1 of the N-rank run is reported too (their all-reduced scores must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """The first step at which any row's token differs (None: equal throughout)."""
    steps = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
    found = [s for s in steps if s is not None]
    return min(found) if found else None


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of |A ∩ B| / |A| for sorted index rows ``[batch, k]``."""
    shares = []
    for row_a, row_b in zip(a, b):
        common = torch.isin(row_a, row_b).sum().item()
        shares.append(common / max(1, row_a.numel()))
    return sum(shares) / len(shares)


def load(folder: str | None, world: int, rank: int, batch: int, budget: Any) -> dict | None:
    if folder is None:
        return None
    path = os.path.join(folder, f"sel_w{world}_r{rank}_b{batch}_k{budget}.pt")
    return torch.load(path) if os.path.exists(path) else None


def compare(one: dict, many: dict, folder: str | None) -> list[dict]:
    rows = []
    reference = {(r["batch"], r["budget"]): r for r in one["rows"] if "tokens" in r}
    for row in many["rows"]:
        ref = reference.get((row["batch"], row["budget"]))
        if ref is None:
            continue
        diverged = first_difference(ref["tokens"], row["tokens"])
        layers = {}
        for layer, digests in ref["selection_digests"].items():
            other = row["selection_digests"].get(layer, [])
            layers[layer] = {"equal_steps": sum(x == y for x, y in zip(digests, other)), "steps": len(digests)}
        sel_one = load(folder, one["world"], 0, row["batch"], row["budget"])
        sel_many = load(folder, many["world"], 0, row["batch"], row["budget"])
        if sel_one is not None and sel_many is not None:
            for layer, steps_one in sel_one.items():
                steps_many = sel_many[layer]
                shares = [overlap(a, b) for a, b in zip(steps_one, steps_many)]
                upto = shares[: (diverged if diverged is not None else len(shares))]
                layers[str(layer)]["overlap_all_steps"] = round(sum(shares) / len(shares), 5)
                layers[str(layer)]["overlap_before_token_difference"] = (
                    round(sum(upto) / len(upto), 5) if upto else None
                )
                layers[str(layer)]["overlap_step0"] = round(shares[0], 5)
        rows.append(
            {
                "batch": row["batch"],
                "budget": row["budget"],
                "selected": row.get("selected"),
                "same_tokens": ref["tokens"] == row["tokens"],
                "first_token_difference": diverged,
                "steps": len(ref["tokens"][0]),
                "same_selections": ref["selection_digests"] == row["selection_digests"],
                "layers": layers,
                "ranks_same_tokens": row.get("ranks_same_tokens"),
                "ranks_same_selections": row.get("ranks_same_selections"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("one", help="the one-GPU run's JSON")
    parser.add_argument("many", help="the N-GPU run's JSON")
    parser.add_argument("--selections", help="the folder both runs saved their selected indices in")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    with open(args.one, encoding="utf-8") as handle:
        one = json.load(handle)
    with open(args.many, encoding="utf-8") as handle:
        many = json.load(handle)
    rows = compare(one, many, args.selections)
    for row in rows:
        layers = " ".join(
            f"L{layer}:{v['equal_steps']}/{v['steps']}"
            + (f"({v['overlap_all_steps']:.4f})" if "overlap_all_steps" in v else "")
            for layer, v in row["layers"].items()
        )
        print(
            f"batch {row['batch']} budget {row['budget']}: same tokens {row['same_tokens']} "
            f"(first difference at step {row['first_token_difference']} of {row['steps']}), "
            f"same selections {row['same_selections']} [{layers}], "
            f"ranks agree: tokens {row['ranks_same_tokens']} selections {row['ranks_same_selections']}"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
