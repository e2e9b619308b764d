"""Gather bandwidth: selected rows from pinned host memory to the GPU, three ways, in one process.

    python benchmarks/transfer.py [--rows 8192] [--host-gib 4] [--programs 32]

For rows of 256 B to 48 KB (random sorted token indices, bf16):

- ``pinned copy``: one contiguous ``copy_`` of the same bytes, pinned host to device (the link's
  practical peak; the baseline);
- ``ours``: ``transfer/triton_gather.py``, the persistent UVA gather on ``--programs`` CTAs,
  indices on the GPU, checked exactly against ``source[indices]``;
- ``seed``: the seed OmniKV's path, CPU ``index_select`` into a pinned staging buffer then a copy
  to the GPU (host-side indices; the device-to-host copy of the indices is not counted).

Prints one JSON object and a table (GB/s, ours as a share of the pinned copy, ours over seed).
Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from omnikv_runtime.tables import format_table


def _median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _wall_ms(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def measure(row_bytes: int, rows: int, host_bytes: int, programs: int, tiles: list[int]) -> dict:
    from omnikv_runtime.transfer.triton_gather import gather_rows

    row_elems = row_bytes // 2
    tokens = max(rows * 2, host_bytes // row_bytes)
    source = torch.randn(1, tokens, row_elems, dtype=torch.bfloat16).pin_memory()
    indices = torch.randperm(tokens, device="cuda")[:rows].sort().values[None]
    out = torch.full((1, rows, row_elems), float("nan"), dtype=torch.bfloat16, device="cuda")
    moved = rows * row_bytes

    contiguous = source[:, :rows]
    copy_target = torch.empty_like(out)
    copy_ms = _median_ms(lambda: copy_target.copy_(contiguous, non_blocking=True))
    ours_ms = _median_ms(lambda: gather_rows(source, indices, out, num_programs=programs))
    exact = torch.equal(out.cpu(), source[0, indices[0].cpu()][None])
    by_tile = {}
    for tile in tiles:  # elements in flight per CTA: the kernel's knob for small rows
        tile_ms = _median_ms(
            lambda tile=tile: gather_rows(source, indices, out, num_programs=programs, tile_elements=tile)
        )
        by_tile[tile] = round(copy_ms / tile_ms, 3)

    host_indices = indices[0].cpu()
    staging = torch.empty(rows, row_elems, dtype=torch.bfloat16).pin_memory()
    seed_target = torch.empty(rows, row_elems, dtype=torch.bfloat16, device="cuda")

    def seed_path() -> None:
        torch.index_select(source[0], 0, host_indices, out=staging)
        seed_target.copy_(staging, non_blocking=True)

    seed_ms = _wall_ms(seed_path)
    return {
        "row_bytes": row_bytes,
        "rows": rows,
        "host_tokens": tokens,
        "pinned_copy_GBps": moved / copy_ms / 1e6,
        "ours_GBps": moved / ours_ms / 1e6,
        "seed_GBps": moved / seed_ms / 1e6,
        "ours_vs_pinned_copy": copy_ms / ours_ms,
        "ours_over_seed": seed_ms / ours_ms,
        "ours_exact": exact,
        "ours_vs_pinned_copy_by_tile": by_tile,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192, help="selected rows per gather")
    parser.add_argument("--host-gib", type=float, default=4.0, help="size of the pinned host tier to gather from")
    parser.add_argument("--programs", type=int, default=32, help="CTAs of the persistent gather")
    parser.add_argument("--row-bytes", default="256,2048,16384,49152")
    parser.add_argument("--tiles", default="", help="also time these tile sizes (elements in flight per CTA)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/transfer.py needs a CUDA GPU: it measures host-to-GPU transfers", file=sys.stderr)
        return 2
    results = [
        measure(
            int(size),
            args.rows,
            int(args.host_gib * 2**30),
            args.programs,
            [int(t) for t in args.tiles.split(",") if t],
        )
        for size in args.row_bytes.split(",")
    ]
    summary = {
        "benchmark": "transfer",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "programs": args.programs,
        "results": results,
    }
    print(json.dumps(summary))
    columns = [("row bytes", "row_bytes", ""), ("pinned copy", "pinned_copy_GBps", ".1f")]
    columns += [("ours", "ours_GBps", ".1f"), ("seed", "seed_GBps", ".1f"), ("ours/copy", "ours_vs_pinned_copy", ".2f")]
    columns += [("ours/seed", "ours_over_seed", ".1f"), ("exact", "ours_exact", "")]
    print("\n" + format_table(results, columns), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
