"""The decode-step kernels alone, against torch's own in the same process (CUDA).

One Llama-3-8B layer's geometry (32 query heads, 8 KV heads, head dim 128, bf16):

- decode attention over a dense layer's buffer (device length + padding mask) by the Triton
  split-K kernel, against SDPA with ``enable_gqa`` and no mask (flash: the fastest torch path);
- the same over a sparse layer's sources (selected rows through an index, plus a tail ring);
- the filter layer's fused max-over-heads scores against the torch einsum + amax, and the dense-layer
  attention that writes those scores as it reads the keys against the two kernels one after the other;
- the gather of one layer's slice of 2048 selected packed rows from pinned host memory.

GB/s counts the bytes each must read once (KV rows; for the gather, the bytes moved). Times are
medians of CUDA-event timings (``triton.testing.do_bench``).

    python benchmarks/decode_kernels.py --contexts 32768,131072 --batches 1,4
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import triton

from omnikv_runtime.kernels import KVSource, decode_attention, max_head_logits
from omnikv_runtime.kernels.decode_attention_triton import TUNING
from omnikv_runtime.kernels.head_scores import max_head_logits_torch
from omnikv_runtime.transfer.triton_gather import gather_rows

HEADS, KV_HEADS, DIM = 32, 8, 128


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep(query, sources, kv_bytes: int, context: int, batch: int) -> list[dict]:
    """The dense-layer attention under each launch shape (restores the defaults afterwards)."""
    defaults = dict(TUNING)
    rows = []
    shapes = itertools.product([64, 128], [2, 4, 8], [4, 8], [2, 3, 4])
    for block, per_sm, warps, stages in shapes:
        TUNING.update(block=block, programs_per_sm=per_sm, num_warps=warps, num_stages=stages)
        try:
            ms = bench(lambda: decode_attention(query, sources, 0.088))
        except Exception as exc:  # a shape that does not fit the card's shared memory
            rows.append({"context": context, "batch": batch, "kernel": "sweep", **TUNING, "error": str(exc)[:80]})
            continue
        row = {"context": context, "batch": batch, "kernel": "sweep", **TUNING, "ms": round(ms, 4)}
        rows.append({**row, "gbps": round(kv_bytes / ms / 1e6, 1)})
    TUNING.clear()
    TUNING.update(defaults)
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print("best launch shape:", json.dumps(best), file=sys.stderr)
    return rows


def sparse_sweep(query, sources, kv_bytes: int, context: int, batch: int) -> list[dict]:
    """The sparse-layer attention (a few thousand selected rows) under each smallest range and programs per
    multiprocessor: its grid is small, so the range size decides how many programs share the card."""
    defaults = dict(TUNING)
    rows = []
    for smallest, per_sm in itertools.product([64, 128, 256], [4, 8, 16]):
        TUNING.update(min_split_columns=smallest, programs_per_sm=per_sm)
        ms = bench(lambda: decode_attention(query, sources, 0.088))
        row = {"context": context, "batch": batch, "kernel": "sparse sweep", **TUNING, "ms": round(ms, 4)}
        rows.append({**row, "gbps": round(kv_bytes / ms / 1e6, 1)})
    TUNING.clear()
    TUNING.update(defaults)
    best = min(rows, key=lambda r: r["ms"])
    print("best sparse-layer shape:", json.dumps(best), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--selected", type=int, default=2048)
    parser.add_argument(
        "--sweep", action="store_true", help="also time the attention kernel's launch shapes (dense and sparse layers)"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    dtype = torch.bfloat16
    rows = []
    for context in [int(x) for x in args.contexts.split(",")]:
        for batch in [int(x) for x in args.batches.split(",")]:
            torch.manual_seed(0)
            query = torch.randn(batch, HEADS, DIM, device=device, dtype=dtype)
            keys = torch.randn(batch, KV_HEADS, context + 256, DIM, device=device, dtype=dtype)
            values = torch.randn_like(keys)
            length = torch.tensor([context], device=device)
            valid = torch.ones(batch, context + 256, dtype=torch.bool, device=device)
            kv_bytes = 2 * batch * KV_HEADS * context * DIM * 2
            dense = [KVSource(keys.transpose(1, 2), values.transpose(1, 2), length=length, mask=valid)]
            ms = ms_dense = bench(lambda: decode_attention(query, dense, 0.088))  # noqa: B023
            if args.sweep:
                rows.extend(sweep(query, dense, kv_bytes, context, batch))
            q4 = query[:, :, None]
            k4, v4 = keys[:, :, :context], values[:, :, :context]
            sdpa = bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)  # noqa: B023
            )
            rows.append(
                {
                    "context": context,
                    "batch": batch,
                    "kernel": "decode attention, dense layer",
                    "ms": round(ms, 4),
                    "gbps": round(kv_bytes / ms / 1e6, 1),
                    "sdpa_flash_ms": round(sdpa, 4),
                    "sdpa_gbps": round(kv_bytes / sdpa / 1e6, 1),
                }
            )
            k = args.selected
            index = torch.sort(torch.randint(0, context, (batch, k), device=device), dim=-1).values
            ring = torch.randn(batch, 256, 4, 2, KV_HEADS, DIM, device=device, dtype=dtype)
            sparse = [
                KVSource(keys.transpose(1, 2), values.transpose(1, 2), index=index, mask=valid[:, :k]),
                KVSource(ring[:, :, 0, 0], ring[:, :, 0, 1], length=torch.tensor([64], device=device)),
            ]
            ms = bench(lambda: decode_attention(query, sparse, 0.088))  # noqa: B023
            sparse_bytes = 2 * batch * KV_HEADS * (k + 64) * DIM * 2
            if args.sweep:
                rows.extend(sparse_sweep(query, sparse, sparse_bytes, context, batch))
            rows.append(
                {
                    "context": context,
                    "batch": batch,
                    "kernel": f"decode attention, sparse layer ({k} indexed + 64 tail)",
                    "ms": round(ms, 4),
                    "gbps": round(sparse_bytes / ms / 1e6, 1),
                }
            )
            view = keys[:, :, :context].transpose(1, 2)
            fused = bench(lambda: max_head_logits(query, view, 0.088, limit=length))  # noqa: B023
            plain = bench(lambda: max_head_logits_torch(query, view, 0.088, limit=length))  # noqa: B023
            key_bytes = batch * KV_HEADS * context * DIM * 2
            rows.append(
                {
                    "context": context,
                    "batch": batch,
                    "kernel": "filter scores (max over heads)",
                    "ms": round(fused, 4),
                    "gbps": round(key_bytes / fused / 1e6, 1),
                    "torch_ms": round(plain, 4),
                }
            )
            scores = torch.empty(batch, context, dtype=torch.float32, device=device)
            both = bench(lambda: decode_attention(query, dense, 0.088, head_max=scores))  # noqa: B023
            rows.append(
                {
                    "context": context,
                    "batch": batch,
                    "kernel": "dense-layer attention writing the filter scores (head_max)",
                    "ms": round(both, 4),
                    "separate_ms": round(ms_dense + fused, 4),
                    "over_separate": round(both / (ms_dense + fused), 3),
                    "over_attention_alone": round(both / ms_dense, 3),
                }
            )
            del keys, values
        arena = torch.randn(1, min(context, 65536), 12, 2, KV_HEADS, DIM, dtype=dtype).pin_memory()
        indices = torch.randint(0, arena.shape[1], (1, args.selected), device=device)
        staging = torch.empty(1, args.selected, 12, 2, KV_HEADS, DIM, device=device, dtype=dtype)
        ms = bench(lambda: gather_rows(arena[:, :, 3], indices, staging[:, :, 3]))  # noqa: B023
        moved = args.selected * 2 * KV_HEADS * DIM * 2
        host = torch.empty(1 << 28, dtype=torch.uint8).pin_memory()
        target = torch.empty_like(host, device=device)
        copy = bench(lambda: target.copy_(host, non_blocking=True))  # noqa: B023
        rows.append(
            {
                "context": context,
                "batch": 1,
                "kernel": f"gather one layer's slice of {args.selected} packed rows (4 KB each), pinned host",
                "ms": round(ms, 4),
                "gbps": round(moved / ms / 1e6, 1),
                "pinned_copy_gbps": round(host.numel() / copy / 1e6, 1),
            }
        )

    result = {
        "device": torch.cuda.get_device_name(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python benchmarks/decode_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
