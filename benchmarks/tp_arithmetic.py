"""Where tensor-parallel arithmetic differs from one GPU's, each source on its own, on one device.

Tensor parallelism over N ranks changes three things in a decoder layer's arithmetic. Each is checked
here with seeded random inputs in the given dtype (bf16 by default) at Llama-3-8B's widths (``--tiny``:
small widths, to check the script on a CPU), for each of ``--tp-sizes``, on one device, emulating a
rank's share by slicing:

- **column** (the q, k, v, gate and up projections): a rank computes 1/N of the output features,
  ``linear(x, W[rows of rank r])`` against one GPU's ``linear(x, W)`` restricted to them (a GEMM may
  tile a narrower matrix otherwise);
- **row bf16** and **row float32** (the attention output, MLP down and LM head projections): each rank's
  partial product over 1/N of the input features, summed over the ranks. ``bf16`` as DeepSpeed does it:
  each partial rounded to bf16, then added one rank after the other with a rounding after each addition
  (as a ring all-reduce adds); ``float32`` as ``distributed.float32_partial_sums`` does it: float32
  partials (on CUDA one GEMM with a float32 output), summed in float32, rounded once. Against one GEMM;
- **attention** (the decode kernel): a rank holds 1/N of the query and KV heads. On CUDA the split-K
  kernel plans its column ranges by rows (batch x KV heads), so fewer heads per rank can mean other
  ranges, another order of the online softmax's merges, and other rounding.

Reported per source, projection (or context), N and rows: the share of output elements that differ from one
device's and the largest absolute difference. Equal everywhere: that source gives one GPU's bits.

    python benchmarks/tp_arithmetic.py --out tp_arithmetic.json                # a GPU, Llama-3-8B widths
    python benchmarks/tp_arithmetic.py --tiny --device cpu --out tiny.json    # the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

from omnikv_runtime.kernels.decode_attention import KVSource, decode_attention
from omnikv_runtime.planner import KNOWN_GEOMETRIES
from omnikv_runtime.tables import format_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode.py, also under python -P
from decode import run_header  # noqa: E402

TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4}
TINY.update(vocab_size=1000, head_dim=32)


def widths(tiny: bool) -> dict[str, int]:
    spec = dict(KNOWN_GEOMETRIES["llama3-8b"]) if not tiny else dict(TINY)
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    head_dim = spec.get("head_dim") or spec["hidden_size"] // heads
    return {
        "hidden": spec["hidden_size"],
        "intermediate": spec["intermediate_size"],
        "vocab": spec["vocab_size"],
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
    }


def compare(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Elements of the ``(one device's, the ranks')`` pairs that differ (over every rank's share), the largest
    difference."""
    differing = sum(int((reference != mine).sum()) for reference, mine in pairs)
    elements = sum(reference.numel() for reference, _ in pairs)
    return {
        "differing": differing,
        "elements": elements,
        "share": round(differing / elements, 6),
        "max_abs": max(float((reference.float() - mine.float()).abs().max()) for reference, mine in pairs),
    }


def float32_product(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the float32 reduction computes per rank (``omnikv_runtime.distributed``): one GEMM with a float32
    output on CUDA, else float32 inputs."""
    if features.is_cuda:
        try:
            return torch.mm(features, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.mm(features.float(), weight.float().t())


def projections(w: dict[str, int], dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> dict:
    """name -> (weight [out, in], kind): Llama's projections at these widths (weights ~ N(0, 0.02))."""
    q, kv = w["heads"] * w["head_dim"], w["kv_heads"] * w["head_dim"]
    shapes = {
        "q_proj": ((q, w["hidden"]), "column"),
        "k_proj": ((kv, w["hidden"]), "column"),
        "v_proj": ((kv, w["hidden"]), "column"),
        "gate_proj": ((w["intermediate"], w["hidden"]), "column"),
        "up_proj": ((w["intermediate"], w["hidden"]), "column"),
        "o_proj": ((w["hidden"], q), "row"),
        "down_proj": ((w["hidden"], w["intermediate"]), "row"),
        "lm_head": ((w["vocab"], w["hidden"]), "row"),
    }
    return {
        name: ((torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype), kind)
        for name, (shape, kind) in shapes.items()
    }


def gemm_rows(weights: dict, tp: int, tokens: int, dtype, device, generator) -> list[dict[str, Any]]:
    rows = []
    for name, (weight, kind) in weights.items():
        features = torch.randn(tokens, weight.shape[1], generator=generator, device=device).to(dtype)
        whole = F.linear(features, weight)
        if kind == "column":
            width = weight.shape[0] // tp
            parts = [slice(rank * width, (rank + 1) * width) for rank in range(tp)]
            result = compare([(whole[:, part], F.linear(features, weight[part])) for part in parts])
            rows.append({"source": "column", "what": name, "tp": tp, "rows": tokens, **result})
            continue
        width = weight.shape[1] // tp
        parts = [slice(rank * width, (rank + 1) * width) for rank in range(tp)]
        summed = F.linear(features[:, parts[0]], weight[:, parts[0]])
        for part in parts[1:]:  # each partial rounded, then a rounding after each addition (a ring's order)
            summed = (summed.float() + F.linear(features[:, part], weight[:, part]).float()).to(dtype)
        wide = sum(float32_product(features[:, part], weight[:, part]) for part in parts).to(dtype)
        rows.append({"source": "row bf16", "what": name, "tp": tp, "rows": tokens, **compare([(whole, summed)])})
        rows.append({"source": "row float32", "what": name, "tp": tp, "rows": tokens, **compare([(whole, wide)])})
    return rows


def attention_row(w: dict[str, int], tp: int, batch: int, context: int, dtype, device, generator) -> dict:
    heads, kv_heads, dim = w["heads"], w["kv_heads"], w["head_dim"]
    query = torch.randn(batch, heads, dim, generator=generator, device=device).to(dtype)
    keys = torch.randn(batch, kv_heads, context, dim, generator=generator, device=device).to(dtype)
    values = torch.randn(batch, kv_heads, context, dim, generator=generator, device=device).to(dtype)
    scale = dim**-0.5
    whole = decode_attention(query, [KVSource(keys.transpose(1, 2), values.transpose(1, 2))], scale)
    q_share, kv_share = heads // tp, kv_heads // tp
    pairs = []
    for rank in range(tp):
        q_part, kv_part = slice(rank * q_share, (rank + 1) * q_share), slice(rank * kv_share, (rank + 1) * kv_share)
        source = KVSource(keys[:, kv_part].transpose(1, 2), values[:, kv_part].transpose(1, 2))
        pairs.append((whole[:, q_part], decode_attention(query[:, q_part].contiguous(), [source], scale)))
    return {"source": "attention", "what": f"context {context}", "tp": tp, "rows": batch, **compare(pairs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp-sizes", default="2,4")
    parser.add_argument("--tokens", default="1,4,4096", help="rows of the projections' inputs (decode batch, chunk)")
    parser.add_argument("--batches", default="1,4", help="decode attention's batch")
    parser.add_argument("--contexts", default="4096,131072", help="decode attention's context")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small widths (a CPU check of the script)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator(device).manual_seed(0)
    w = widths(args.tiny)
    weights = projections(w, dtype, device, generator)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for tp in (int(t) for t in args.tp_sizes.split(",")):
            for tokens in (int(t) for t in args.tokens.split(",")):
                rows += gemm_rows(weights, tp, tokens, dtype, device, generator)
            for batch in (int(b) for b in args.batches.split(",")):
                for context in (int(c) for c in args.contexts.split(",")):
                    rows.append(attention_row(w, tp, batch, context, dtype, device, generator))
    result = {**run_header(device, "tp_arithmetic.py", argv), "dtype": args.dtype, "widths": w, "rows": rows}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    columns = [
        ("source", "source", ""),
        ("what", "what", ""),
        ("tp", "tp", ""),
        ("rows", "rows", ""),
        ("differing", "differing", ""),
        ("share", "share", ".4%"),
        ("max abs", "max_abs", ".3g"),
    ]
    print(format_table(rows, columns), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
