"""Hot-cache hit rate on real selection dynamics: record on the bundled model, replay on Llama-3-8B rows.

``record`` runs the bundled model (SmolLM2-135M, ``configs/default.json``) on long prompts, keeps
every filter layer's selected indices at every decode step, and saves them as safetensors
(``[steps, k]`` int32 per prompt and filter layer; never pickle).

``replay`` feeds those index sequences through the runtime's :class:`HotCache` with the rows of
Llama-3-8B's segments (filter layers 2, 8, 18, one wait layer: 4, 8 and 12 sparse layers of
8 KV heads x 128 x bf16) and reports bytes over PCIe per step with and without the hot cache, for
several sizes and eviction policies, next to the offline optimum (Belady: evict the row needed
furthest in the future). On CUDA it also times the real gathers (Triton, pinned host arena).

    python benchmarks/hot_cache.py record --out docs/selection_trace.safetensors
    python benchmarks/hot_cache.py replay --trace docs/selection_trace.safetensors > hot_cache.json
    python benchmarks/hot_cache.py sources   # what a fetch started before a filter layer picks could use

``sources`` measures, per filter layer after the first, the share of each step's selection that was known
before that layer picked it: the same layer's selection at the previous step (what the hot cache keeps), the
earlier filter layer's selection at the same step (what a fetch started one segment early could move), and
either; and how many rows, as a share of the budget, fetching the earlier layer's selection ahead would move
in vain (neither selected nor already resident from the previous step).

Prints JSON on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import omnikv_runtime as okv
from omnikv_runtime.listeners import SelectionRecorder
from omnikv_runtime.policies import make_eviction_policy
from omnikv_runtime.tables import format_table
from omnikv_runtime.transfer import HotCache

REPO = Path(__file__).resolve().parent.parent
TARGET_SPARSE_LAYERS = (4, 8, 12)  # Llama-3-8B, filter layers 2, 8, 18, one wait layer
TARGET_ROW_BYTES_PER_LAYER = 2 * 8 * 128 * 2  # keys and values, 8 KV heads x 128 x bf16


def _prompts(tokenizer, tokens: int) -> dict[str, str]:
    from omnikv_runtime.eval.passkey import build_passkey_prompt

    passkey, _ = build_passkey_prompt(tokenizer, tokens, 0.5, seed=0)
    design = (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    ids = tokenizer(design, add_special_tokens=False)["input_ids"][: tokens - 40]
    prose = tokenizer.decode(ids) + "\n\nSummarise the measurements above in a few sentences."
    prose = tokenizer.apply_chat_template(
        [{"role": "user", "content": prose}], tokenize=False, add_generation_prompt=True
    )
    return {"passkey": passkey, "prose": prose}


def record(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = okv.load_model("smollm2-135m")
    engine = okv.initialize(model, args.config, tokenizer=tokenizer)
    tensors: dict[str, torch.Tensor] = {}
    summary = {}
    for name, text in _prompts(tokenizer, args.tokens).items():
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        cache = engine.new_cache(reserve_tokens=ids.shape[1] + args.new_tokens, prompt_tokens=ids.shape[1])
        trace = SelectionRecorder(contexts=False)
        with torch.inference_mode(), engine.listening(trace):
            model.generate(
                ids,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **{engine.cache_keyword: cache},
                prefill_chunk_size=engine.config.prefill.chunk_size,
            )
        for layer in sorted({event.layer for event in trace.records}):
            steps = [event.indices[0] for event in trace.records if event.layer == layer]
            tensors[f"{name}/layer{layer}"] = torch.stack(steps).to(torch.int32)
        summary[name] = {"prompt_tokens": int(ids.shape[1]), "steps": len(steps), "k": int(steps[0].shape[0])}
    metadata = {"model": "smollm2-135m", "config": str(args.config), "summary": json.dumps(summary)}
    save_file(tensors, args.out, metadata=metadata)
    return {"saved": str(args.out), **summary}


def belady_misses(steps: torch.Tensor, slots: int) -> int:
    """Misses of the offline optimum: on a miss with a full cache, evict the row needed furthest ahead."""
    sequence = [set(row.tolist()) for row in steps]
    uses: dict[int, list[int]] = {}
    for t, wanted in enumerate(sequence):
        for token in wanted:
            uses.setdefault(token, []).append(t)
    cached: set[int] = set()
    misses = 0
    for t, wanted in enumerate(sequence):
        new = wanted - cached
        misses += len(new)
        overflow = len(cached | wanted) - slots
        if overflow > 0:
            candidates = cached - wanted

            def next_use(token: int, t: int = t) -> int:
                later = uses[token]
                position = bisect.bisect_right(later, t)
                return later[position] if position < len(later) else len(sequence) + 1

            for token in sorted(candidates, key=next_use, reverse=True)[:overflow]:
                cached.discard(token)
        cached |= wanted
        while len(cached) > slots:  # the selection alone outgrows the cache: keep what is needed soonest
            cached.discard(max(cached, key=lambda token: (token not in wanted, token)))
    return misses


def replay_segment(steps: torch.Tensor, slots: int, eviction: str, device: torch.device) -> tuple[int, int]:
    """(hits, misses) of the runtime's HotCache over one segment's selections."""
    tokens = int(steps.max()) + 1
    hot = HotCache(make_eviction_policy({"type": eviction}), 1, slots, (1,), torch.float32, device, tokens)
    for row in steps.to(device, torch.long):
        hot.plan(row[None], tokens)
    return int(hot.hits), int(hot.misses)


def time_gathers(steps_by_segment: list[torch.Tensor], multiple: int, device: torch.device) -> float | None:
    """Milliseconds per step of the real Triton gathers (all segments), through a hot cache if multiple > 0.

    Wall time on the GPU's clock between the first and last step, so it includes the launch gaps of
    the hot cache's bookkeeping kernels (about 35 small kernels per segment and step).
    """
    if device.type != "cuda":
        return None
    from omnikv_runtime.transfer.triton_gather import gather_rows

    context = max(int(s.max()) for s in steps_by_segment) + 1
    setups = []
    for steps, layers in zip(steps_by_segment, TARGET_SPARSE_LAYERS):
        row = (layers, 2, 8, 128)
        arena = torch.randn(1, context, *row, dtype=torch.bfloat16).pin_memory()
        out = torch.empty(1, steps.shape[1], *row, dtype=torch.bfloat16, device=device)
        hot = None
        if multiple:
            hot = HotCache(
                make_eviction_policy({"type": "lru"}),
                1,
                multiple * steps.shape[1],
                row,
                torch.bfloat16,
                device,
                context,
            )
        setups.append((steps.to(device, torch.long), arena, out, hot))
    steps, arena, out, _ = setups[0]  # compile both kernel variants before timing
    scratch = HotCache(
        make_eviction_policy({"type": "lru"}), 1, steps.shape[1], arena.shape[2:], arena.dtype, device, context
    )
    gather_rows(arena, steps[0][None], out)
    host_rows, hot_slots = scratch.plan(steps[0][None], context)
    gather_rows(arena, host_rows, out, hot=scratch.data, hot_slots=hot_slots)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for t in range(steps_by_segment[0].shape[0]):
        for steps, arena, out, hot in setups:
            indices = steps[t][None]
            if hot is None:
                gather_rows(arena, indices, out)
            else:
                host_rows, hot_slots = hot.plan(indices, context)
                gather_rows(arena, host_rows, out, hot=hot.data, hot_slots=hot_slots)
    end.record()
    torch.cuda.synchronize()
    for steps, arena, out, _ in setups:  # the last step's rows are exact
        assert torch.equal(out.cpu(), arena[0, steps[-1].cpu()][None])
    return round(start.elapsed_time(end) / steps_by_segment[0].shape[0], 3)


def replay(args: argparse.Namespace) -> dict[str, Any]:
    tensors = load_file(args.trace)
    prompts = sorted({key.split("/")[0] for key in tensors})
    device = torch.device(args.device)
    rows = []
    for prompt in prompts:
        layers = sorted(
            (key for key in tensors if key.startswith(prompt + "/")), key=lambda k: int(k.split("layer")[1])
        )
        segments = [tensors[key] for key in layers]
        k = segments[0].shape[1]
        row_bytes = [n * TARGET_ROW_BYTES_PER_LAYER for n in TARGET_SPARSE_LAYERS]
        without = sum(k * b for b in row_bytes)
        steps = segments[0].shape[0]
        rows.append(
            {
                "prompt": prompt,
                "k": k,
                "steps": steps,
                "hot": "none",
                "bytes_per_step": without,
                "reduction": 1.0,
                "gather_ms_per_step": time_gathers(segments, 0, device),
            }
        )
        for multiple in args.multiples:
            for eviction in args.evictions:
                fetched = 0
                hits = misses = 0
                for seg_steps, seg_row in zip(segments, row_bytes):
                    h, m = replay_segment(seg_steps, multiple * k, eviction, device)
                    hits, misses, fetched = hits + h, misses + m, fetched + m * seg_row
                row = {
                    "prompt": prompt,
                    "k": k,
                    "steps": steps,
                    "hot": f"{multiple}x {eviction}",
                    "bytes_per_step": int(fetched / steps),
                    "reduction": round(without * steps / max(fetched, 1), 2),
                    "hit_rate": round(hits / (hits + misses), 3),
                }
                if eviction == "lru":
                    row["gather_ms_per_step"] = time_gathers(segments, multiple, device)
                rows.append(row)
            optimum = sum(belady_misses(s, multiple * k) * b for s, b in zip(segments, row_bytes))
            rows.append(
                {
                    "prompt": prompt,
                    "k": k,
                    "steps": steps,
                    "hot": f"{multiple}x offline optimum",
                    "bytes_per_step": int(optimum / steps),
                    "reduction": round(without * steps / max(optimum, 1), 2),
                }
            )
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "trace": str(args.trace),
        "target": "Llama-3-8B rows, filter layers 2,8,18 (4/8/12 sparse layers)",
        "rows": rows,
    }


def sources(args: argparse.Namespace) -> dict[str, Any]:
    tensors = load_file(args.trace)
    rows = []
    for prompt in sorted({key.split("/")[0] for key in tensors}):
        layers = sorted(int(key.split("layer")[1]) for key in tensors if key.startswith(prompt + "/"))
        for earlier, layer in zip(layers, layers[1:]):
            picks, ahead = tensors[f"{prompt}/layer{layer}"], tensors[f"{prompt}/layer{earlier}"]
            shares = {"previous_step": 0.0, "earlier_layer": 0.0, "either": 0.0, "moved_in_vain": 0.0}
            for step in range(1, picks.shape[0]):
                chosen, before = set(picks[step].tolist()), set(picks[step - 1].tolist())
                guess = set(ahead[step].tolist())
                shares["previous_step"] += len(chosen & before) / len(chosen)
                shares["earlier_layer"] += len(chosen & guess) / len(chosen)
                shares["either"] += len(chosen & (before | guess)) / len(chosen)
                shares["moved_in_vain"] += len(guess - chosen - before) / len(chosen)
            steps = picks.shape[0] - 1
            rows.append(
                {"prompt": prompt, "layer": layer, "earlier": earlier, "steps": steps}
                | {name: round(total / steps, 3) for name, total in shares.items()}
            )
    return {"date": time.strftime("%Y-%m-%d"), "trace": str(args.trace), "rows": rows}


def table(rows: list[dict[str, Any]]) -> str:
    columns = ["prompt", "k", "steps", "hot", "bytes_per_step", "reduction", "hit_rate", "gather_ms_per_step"]
    return format_table(rows, [(column, column, "") for column in columns], markdown=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="record selections on the bundled model")
    rec.add_argument("--config", default="default")
    rec.add_argument("--tokens", type=int, default=3000)
    rec.add_argument("--new-tokens", type=int, default=128)
    rec.add_argument("--out", default=str(REPO / "docs" / "selection_trace.safetensors"))
    rep = commands.add_parser("replay", help="replay a trace through the hot cache with Llama-3-8B rows")
    rep.add_argument("--trace", default=str(REPO / "docs" / "selection_trace.safetensors"))
    rep.add_argument("--multiples", default="1,2,4")
    rep.add_argument("--evictions", default="lru,lfu,none")
    rep.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    src = commands.add_parser("sources", help="what of each selection was known before its filter layer picked")
    src.add_argument("--trace", default=str(REPO / "docs" / "selection_trace.safetensors"))
    args = parser.parse_args(argv)
    if args.command == "record":
        result = record(args)
        print(json.dumps(result, indent=1))
        return 0
    if args.command == "sources":
        result = sources(args)
        print(json.dumps(result, indent=1))
        columns = ["prompt", "layer", "earlier", "steps", "previous_step", "earlier_layer", "either", "moved_in_vain"]
        print(format_table(result["rows"], [(c, c, "") for c in columns], markdown=True), file=sys.stderr)
        return 0
    args.multiples = [int(x) for x in args.multiples.split(",")]
    args.evictions = args.evictions.split(",")
    result = replay(args)
    print(json.dumps(result, indent=1))
    print(table(result["rows"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
