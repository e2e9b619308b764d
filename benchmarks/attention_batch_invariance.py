"""Is one row's decode attention the same whatever else is in the batch, and what does that cost? (CUDA, bf16,
Llama-3-8B heads: 32 query heads, 8 KV heads, head dim 128)

The split-K decode attention kernel cuts each row into ranges of columns. Its plan sizes the ranges from the
row's columns, the KV heads and the card, never from the batch, so row 0 of a batch has the bits it has alone.
The baseline, timed in the same process, is the plan the kernel had before: as many ranges as fill the card for
the whole batch, so a row's ranges (and the order its float32 partial sums combine in) changed with the batch.
For each context and batch: whether row 0 equals the batch-1 result under each plan, whether a buffer 400
columns wider changes it, and the kernel's time under each plan (median of CUDA-event timings). The linear
layers are checked the same way, for each of Llama-3-8B's projection shapes, under cuBLAS and under the
batch-invariant kernel (``generation.batch_invariant``): the row counts from 2 to ``--max-linear-rows`` at which
row 0 of the product differs from the row's product alone, and each product's time at ``--linear-timed-rows``
(``--linear-only``: this part alone).

    python benchmarks/attention_batch_invariance.py --contexts 4100,32800,131072 --batches 1,4,14

Prints one JSON object on stdout (and writes it with ``--out``) and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton

from omnikv_runtime.kernels import KVSource, decode_attention
from omnikv_runtime.kernels import decode_attention_triton as kernel
from omnikv_runtime.kernels.invariant_linear import invariant_linear
from omnikv_runtime.tables import format_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode.py, also under python -P
from decode import run_header  # noqa: E402

HEADS, KV_HEADS, DIM = 32, 8, 128
# Llama-3-8B's projections, (in, out): q and o, k and v, gate and up, down, the LM head
PROJECTIONS = {
    "q/o": (4096, 4096),
    "k/v": (4096, 1024),
    "gate/up": (4096, 14336),
    "down": (14336, 4096),
    "lm_head": (4096, 128256),
}


def graph_ms(call, repeats: int = 50) -> float:
    """GPU milliseconds of one ``call``, as a decode step's CUDA graph runs it: ``repeats`` calls recorded in one
    graph, the graph's replay timed (median of CUDA-event timings) and divided by ``repeats``. Timing the calls
    one by one would time their launches (Triton's Python launch costs more than these kernels on the GPU)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile and warm up outside the recording
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median") / repeats


def linear_check(max_rows: int, timed_rows: list[int]) -> list[dict]:
    """For each projection, cuBLAS (``torch.nn.functional.linear``) and the batch-invariant kernel
    (``generation.batch_invariant``), bf16: the row counts 2..``max_rows`` at which row 0 of the product is not
    bit-identical to the row's product alone, and the product's GPU time at ``timed_rows`` rows (in a CUDA
    graph, :func:`graph_ms`) with the weight's bytes over it."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for name, (inputs, outputs) in PROJECTIONS.items():
        weight = torch.randn(outputs, inputs, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02
        x = torch.randn(max(max_rows, *timed_rows), inputs, device="cuda", dtype=torch.bfloat16, generator=generator)
        for product_name, product in (("cuBLAS", torch.nn.functional.linear), ("invariant", invariant_linear)):
            alone = product(x[:1], weight)[0]
            row = {"projection": name, "product": product_name, "differs_at_rows": []}
            row["differs_at_rows"] = [
                n for n in range(2, max_rows + 1) if not torch.equal(product(x[:n], weight)[0], alone)
            ]
            for rows in timed_rows:
                ms = graph_ms(lambda p=product, i=x[:rows], w=weight: p(i, w))
                row[f"ms_{rows}_rows"] = round(ms, 4)
                row[f"gbps_{rows}_rows"] = round(weight.numel() * 2 / ms / 1e6, 1)
            results.append(row)
    for row in results:
        if row["product"] == "invariant":
            cublas = next(r for r in results if r["projection"] == row["projection"] and r["product"] == "cuBLAS")
            for rows in timed_rows:
                row[f"time_vs_cublas_{rows}_rows"] = round(row[f"ms_{rows}_rows"] / cublas[f"ms_{rows}_rows"], 3)
    return results


def batch_split_plan(batch: int):
    """The previous plan: ranges enough to fill the card for ``batch`` rows (so their size follows the batch)."""

    def plan(columns: int, kv_heads: int, multiprocessors: int, block: int) -> tuple[int, int]:
        if columns == 0:
            return 1, block
        wanted = max(1, math.ceil(kernel.TUNING["programs_per_sm"] * multiprocessors / (batch * kv_heads)))
        splits = max(1, min(wanted, math.ceil(columns / kernel.TUNING["min_split_columns"])))
        chunk = math.ceil(math.ceil(columns / splits) / block) * block
        return math.ceil(columns / chunk), chunk

    return plan


def attend(query, keys, values, rows: int, columns: int, length: int) -> torch.Tensor:
    lengths = torch.full((rows,), length, device="cuda")
    source = KVSource(keys[:rows, :, :columns].transpose(1, 2), values[:rows, :, :columns].transpose(1, 2), lengths)
    return decode_attention(query[:rows], [source], 0.088)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="4100,32800,131072")
    parser.add_argument("--batches", default="1,4,14")
    parser.add_argument("--max-linear-rows", type=int, default=16, help="the projections' check: 2..N rows")
    parser.add_argument("--linear-timed-rows", default="1,4,14", help="the projections' timings: at these rows")
    parser.add_argument("--linear-only", action="store_true", help="skip the attention part")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    torch.manual_seed(0)
    rows = []
    current = kernel._split_plan
    for context in [] if args.linear_only else contexts:
        columns = context + 32
        keys = torch.randn(max(batches), KV_HEADS, columns + 400, DIM, device="cuda", dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        query = torch.randn(max(batches), HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        for plan_name in ("batch-independent", "by batch (before)"):
            alone = None
            for batch in batches:
                kernel._split_plan = current if plan_name == "batch-independent" else batch_split_plan(batch)
                try:
                    out = attend(query, keys, values, batch, columns, context)
                    if alone is None:
                        alone = attend(query, keys, values, 1, columns, context)
                    wider = attend(query, keys, values, batch, columns + 400, context)
                    ms = triton.testing.do_bench(
                        lambda: attend(query, keys, values, batch, columns, context),  # noqa: B023
                        warmup=25,
                        rep=100,
                        return_mode="median",
                    )
                finally:
                    kernel._split_plan = current
                kv_bytes = 2 * batch * KV_HEADS * context * DIM * 2
                rows.append(
                    {
                        "context": context,
                        "batch": batch,
                        "plan": plan_name,
                        "row0_equals_batch1": torch.equal(out[0], alone[0]),
                        "max_diff": (out[0].float() - alone[0].float()).abs().max().item(),
                        "wider_buffer_equal": torch.equal(wider, out),
                        "ms": round(ms, 4),
                        "gbps": round(kv_bytes / ms / 1e6, 1),
                    }
                )
    for row in rows:
        if row["plan"] == "batch-independent":
            before = next(
                r
                for r in rows
                if r["plan"] != row["plan"] and (r["context"], r["batch"]) == (row["context"], row["batch"])
            )
            row["time_vs_before"] = round(row["ms"] / before["ms"], 3)
    linear = linear_check(args.max_linear_rows, [int(x) for x in args.linear_timed_rows.split(",")])
    result = {
        **run_header(torch.device("cuda"), "attention_batch_invariance.py", argv),
        "attention": rows,
        "linear": linear,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    columns = [
        ("context", "context", ""),
        ("batch", "batch", ""),
        ("split plan", "plan", ""),
        ("row 0 == alone", "row0_equals_batch1", ""),
        ("max diff", "max_diff", ".2g"),
        ("+400 columns ==", "wider_buffer_equal", ""),
        ("ms", "ms", ".4f"),
        ("GB/s", "gbps", ".0f"),
        ("time vs before", "time_vs_before", ".3f"),
    ]
    if rows:
        print(format_table(rows, columns), file=sys.stderr)
    timed = [int(x) for x in args.linear_timed_rows.split(",")]
    linear_columns = [
        ("projection", "projection", ""),
        ("product", "product", ""),
        ("row 0 differs at", "differs_at_rows", ""),
    ]
    linear_columns += [(f"ms, {n} rows", f"ms_{n}_rows", ".4f") for n in timed]
    linear_columns += [(f"vs cuBLAS, {n}", f"time_vs_cublas_{n}_rows", ".3f") for n in timed]
    print(format_table(linear, linear_columns), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
