"""The decode step's projections, cuBLAS against the grouped kernel (``omnikv_runtime.kernels.decode_linear``).

Llama-3-8B geometry, random bf16 weights, several layers' weights (more than the L2 cache holds, so every
replay reads HBM), each stage of a layer captured in a CUDA graph over those layers and replayed:

- ``qkv``: cuBLAS's three products against one grouped launch;
- ``o``: the output projection;
- ``gate_up``: cuBLAS's two products and the SiLU-gated product kernel against one gated launch;
- ``down``: the down projection.

For each stage and batch, every launch shape of the sweep is timed; the table gives cuBLAS, the best shape
and its ratio, with the bandwidth each reaches (weight bytes over time). Each grouped output is checked
against torch's linear (bf16 tolerance) and its first row against the same row computed alone (equal bits).

    python benchmarks/decode_linear.py --batches 1,4,16 --out decode_linear.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial

import torch
import torch.nn.functional as F

from omnikv_runtime.kernels.decode_linear import gated_linear, grouped_linear
from omnikv_runtime.kernels.layer_ops import silu_mul

HIDDEN, KV, INTERMEDIATE = 4096, 1024, 14336


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--layers", type=int, default=8, help="distinct weight sets a replay walks through")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--block-n", default="16,32,64")
    parser.add_argument("--block-k", default="128,256,512")
    parser.add_argument("--stages", default="3,4")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--out", default="")
    return parser.parse_args()


def graph_us(body, layers: int, replays: int) -> float:
    """Microseconds a layer of ``body`` (called once per layer index) takes, replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for layer in range(layers):
            body(layer)  # warm-up: compiles and allocates outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            body(layer)
    for _ in range(3):
        graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1000 / replays / layers


def run_stage(stage: str, shape: dict | None, x, wide, w: dict) -> list[torch.Tensor]:
    """One layer's stage: through cuBLAS (``shape`` None, with the SiLU-gated product kernel) or grouped."""
    if shape is None:
        if stage == "qkv":
            return [F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"])]
        if stage == "o":
            return [F.linear(x, w["o"])]
        if stage == "gate_up":
            return [silu_mul(F.linear(x, w["gate"]), F.linear(x, w["up"]))]
        return [F.linear(wide, w["down"])]
    if stage == "qkv":
        return grouped_linear(x, [w["q"], w["k"], w["v"]], shape)
    if stage == "o":
        return grouped_linear(x, [w["o"]], shape)
    if stage == "gate_up":
        return [gated_linear(x, w["gate"], w["up"], shape)]
    return grouped_linear(wide, [w["down"]], shape)


def layer_stage(stage: str, shape: dict | None, x, wide, weights: list[dict], layer: int) -> list[torch.Tensor]:
    return run_stage(stage, shape, x, wide, weights[layer])


def main() -> int:
    args = parse()
    device = torch.device("cuda")
    torch.manual_seed(0)
    weights = [
        {
            name: torch.randn(out, into, dtype=torch.bfloat16, device=device) * 0.02
            for name, (out, into) in {
                "q": (HIDDEN, HIDDEN),
                "k": (KV, HIDDEN),
                "v": (KV, HIDDEN),
                "o": (HIDDEN, HIDDEN),
                "gate": (INTERMEDIATE, HIDDEN),
                "up": (INTERMEDIATE, HIDDEN),
                "down": (HIDDEN, INTERMEDIATE),
            }.items()
        }
        for _ in range(args.layers)
    ]
    nbytes = {
        "qkv": (HIDDEN + 2 * KV) * HIDDEN * 2,
        "o": HIDDEN * HIDDEN * 2,
        "gate_up": 2 * INTERMEDIATE * HIDDEN * 2,
        "down": HIDDEN * INTERMEDIATE * 2,
    }
    shapes = [
        {"BLOCK_N": n, "BLOCK_K": k, "num_stages": s, "num_warps": w}
        for n, k, s, w in itertools.product(
            *(map(int, getattr(args, f).split(",")) for f in ("block_n", "block_k", "stages", "warps"))
        )
    ]
    results = []
    for batch in map(int, args.batches.split(",")):
        x = torch.randn(batch, HIDDEN, dtype=torch.bfloat16, device=device)
        wide = torch.randn(batch, INTERMEDIATE, dtype=torch.bfloat16, device=device) * 0.1

        for stage in nbytes:
            reference = run_stage(stage, None, x, wide, weights[0])
            row = {"batch": batch, "stage": stage, "weight_bytes": nbytes[stage]}
            row["cublas_us"] = graph_us(partial(layer_stage, stage, None, x, wide, weights), args.layers, args.replays)
            timings = []
            for shape in shapes:
                try:
                    got = run_stage(stage, shape, x, wide, weights[0])
                    for out, ref in zip(got, reference):
                        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
                    body = partial(layer_stage, stage, shape, x, wide, weights)
                    timings.append({**shape, "us": graph_us(body, args.layers, args.replays)})
                except Exception as error:  # a shape that does not compile or fit: recorded, not fatal
                    timings.append({**shape, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            timed = [t for t in timings if "us" in t]
            best = min(timed, key=lambda t: t["us"]) if timed else None
            row.update(shapes=timings, best=best)
            if best:
                row["best_over_cublas"] = best["us"] / row["cublas_us"]
                row["cublas_GBps"] = nbytes[stage] / row["cublas_us"] / 1e3
                row["best_GBps"] = nbytes[stage] / best["us"] / 1e3
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "shapes"}), file=sys.stderr, flush=True)
    invariant = check_row_invariance(weights[0], device)
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "results": results,
        "row_invariance": invariant,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    print("| batch | stage | cuBLAS us | GB/s | grouped best us | GB/s | ratio | shape |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for row in results:
        best = row.get("best") or {}
        print(
            f"| {row['batch']} | {row['stage']} | {row['cublas_us']:.2f} | {row.get('cublas_GBps', 0):.0f} | "
            f"{best.get('us', float('nan')):.2f} | {row.get('best_GBps', 0):.0f} | "
            f"{row.get('best_over_cublas', float('nan')):.3f} | "
            f"{best.get('BLOCK_N')}/{best.get('BLOCK_K')}/{best.get('num_stages')}/{best.get('num_warps')} |",
            file=sys.stderr,
        )
    print(f"row invariance (row 0 alone == in 1..64 rows): {invariant}", file=sys.stderr)
    return 0


def check_row_invariance(w: dict, device: torch.device) -> dict:
    """Row 0 of every grouped product with 1 to 64 rows against row 0 alone, default shape: equal bits?"""
    x = torch.randn(64, HIDDEN, dtype=torch.bfloat16, device=device)
    x[1:] *= 30
    alone = grouped_linear(x[:1], [w["q"], w["k"], w["v"]]) + [gated_linear(x[:1], w["gate"], w["up"])]
    differ = []
    for rows in range(2, 65):
        together = grouped_linear(x[:rows], [w["q"], w["k"], w["v"]]) + [gated_linear(x[:rows], w["gate"], w["up"])]
        if not all(torch.equal(a[0], b[0]) for a, b in zip(alone, together)):
            differ.append(rows)
    return {"rows_checked": "2..64", "rows_that_differ": differ}


if __name__ == "__main__":
    sys.exit(main())
