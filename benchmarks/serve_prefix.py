"""Prefix reuse in the server: questions about one long document, with and without the prefix cache.

One document of ``--context`` tokens (random ids) and ``--questions`` questions of ``--question-tokens`` tokens
each; each request is the document then its question, sent one after another (each waits for the last to end)
to the server's real :class:`~omnikv_runtime.serve.scheduler.Scheduler` (one slot, no HTTP). Two runs in this
process over the same engine: the baseline (``prefix_cache_bytes`` 0: every question prefills the whole
document) and one with a prefix cache that holds the document (``--prefix-cache-bytes``, default: the
document once and every question). Reported per question: time to first token (submission to the first token's
event) of both runs, and tokens reused; the ratio of questions 2.. to the first (mean TTFT; also to the first
without reuse, whose TTFT does not include storing the document's blocks); and whether every
answer (greedy tokens) equals the baseline's.

Models: ``--model random-llama3-8b`` is the Llama-3-8B geometry with random bf16 weights on the GPU;
``--model tiny`` a small random Llama in float32 on the CPU, to check the script:

    python benchmarks/serve_prefix.py --model random-llama3-8b --context 131072 --offload cpu --out prefix.json
    python benchmarks/serve_prefix.py --model tiny --context 512

Prints one JSON object on stdout (and writes it with ``--out``) and a table on stderr; exits 1 when an answer
differs from the baseline's or a question after the first reused nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from typing import Any

import torch

import omnikv_runtime as okv
from omnikv_runtime.serve.prefix_cache import DEFAULT_BLOCK_TOKENS, block_bytes
from omnikv_runtime.serve.requests import ServeRequest
from omnikv_runtime.serve.scheduler import Scheduler
from omnikv_runtime.tables import format_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode.py, also under python -P
from decode import FILTER_LAYERS, random_model, run_header  # noqa: E402
from serve_load import WordTokenizer  # noqa: E402


def build_engine(args: argparse.Namespace, model: Any = None) -> okv.Engine:
    """The runtime over ``model`` (default: the benchmarks' random model of ``args.model``), configured from
    ``args`` (budget, offload tier, host dtype, prefill chunk; ``batch_invariant`` where ``args`` has it)."""
    if model is None:
        _, model, _, _ = random_model(args.device, args.model == "tiny")
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    budget = int(args.budget) if args.budget >= 1 and args.budget == int(args.budget) else args.budget
    config: dict[str, Any] = {
        "omnikv": {"filter_layers": FILTER_LAYERS, "wait_layers": 1, "token_budget": budget},
        "offload": {"device": args.offload, "host_dtype": args.host_dtype},
        "prefill": {"chunk_size": args.prefill_chunk},
    }
    if getattr(args, "batch_invariant", False):
        config["generation"] = {"batch_invariant": True}
    return okv.initialize(model, config, tokenizer=WordTokenizer(model.config.vocab_size))


def requests(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(args.seed)
    document = torch.randint(1, vocab, (args.context,), generator=generator).tolist()
    questions = torch.randint(1, vocab, (args.questions, args.question_tokens), generator=generator).tolist()
    return [document + question for question in questions]


def ask(scheduler: Scheduler, name: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """One request, alone: its tokens and time to first token."""
    tokens: list[int] = []
    first: list[float] = []
    done = threading.Event()

    def on_event(event) -> None:
        if not first:
            first.append(time.perf_counter())
        tokens.extend(event.token_ids)
        if event.finish_reason is not None:
            done.set()

    reused_before = scheduler.metrics()["prefix_cache_hit_tokens_total"]
    start = time.perf_counter()
    scheduler.submit(ServeRequest(name, tuple(ids), max_tokens, temperature=0.0), on_event)
    if not done.wait(3600):
        raise TimeoutError(f"request {name} did not finish within an hour")
    reused = scheduler.metrics()["prefix_cache_hit_tokens_total"] - reused_before
    return {"tokens": tokens, "ttft_ms": (first[0] - start) * 1e3, "reused": reused}


def run(engine: okv.Engine, args: argparse.Namespace, prompts: list[list[int]], prefix_bytes: int) -> list[dict]:
    context = len(prompts[0]) + args.max_tokens
    scheduler = Scheduler(
        engine,
        max_batch=1,
        max_context=context,
        max_new_tokens=args.max_tokens,
        prefix_cache_bytes=prefix_bytes,
        prefix_block_tokens=args.block_tokens,
    )
    scheduler.start()
    try:
        return [ask(scheduler, f"q{i}", ids, args.max_tokens) for i, ids in enumerate(prompts)]
    finally:
        scheduler.shutdown()
        del scheduler
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("random-llama3-8b", "tiny"), default="random-llama3-8b")
    parser.add_argument("--context", type=int, default=131072, help="document tokens (default: 131072)")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per question")
    parser.add_argument("--offload", choices=("cpu", "none"), default="cpu")
    parser.add_argument("--host-dtype", choices=("auto", "float8_e4m3fn"), default="auto")
    parser.add_argument("--budget", type=float, default=2048, help="omnikv.token_budget")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="prefill.chunk_size")
    parser.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS)
    parser.add_argument("--prefix-cache-bytes", type=int, help="default: the document once and every question")
    parser.add_argument("--device", help="default: cuda when there is one (random-llama3-8b), else cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and args.model != "tiny" else "cpu"
    engine = build_engine(args)
    prompts = requests(args, engine.model.config.vocab_size)
    if args.prefix_cache_bytes is None:
        # the document's blocks once (every question shares them), and each question's own (with the block the
        # document ends in, when it ends inside one)
        question_blocks = -(-args.question_tokens // args.block_tokens) + 1
        blocks = -(-args.context // args.block_tokens) + question_blocks * len(prompts)
        args.prefix_cache_bytes = blocks * sum(block_bytes(engine, args.block_tokens))
    with torch.inference_mode():
        baseline = run(engine, args, prompts, 0)
        reusing = run(engine, args, prompts, args.prefix_cache_bytes)
    rows = []
    for i, (plain, reuse) in enumerate(zip(baseline, reusing, strict=True)):
        rows.append(
            {
                "question": i + 1,
                "prompt_tokens": len(prompts[i]),
                "reused_tokens": reuse["reused"],
                "ttft_ms": reuse["ttft_ms"],
                "ttft_baseline_ms": plain["ttft_ms"],
                "same_answer": reuse["tokens"] == plain["tokens"],
            }
        )
    later = [row["ttft_ms"] for row in rows[1:]]
    ratio = sum(later) / len(later) / rows[0]["ttft_ms"] if later else None
    # the first question's TTFT with the cache also pays for storing its blocks; without it, the prefill alone
    plain_ratio = sum(later) / len(later) / rows[0]["ttft_baseline_ms"] if later else None
    ok = all(row["same_answer"] for row in rows) and all(row["reused_tokens"] > 0 for row in rows[1:])
    result = {
        **run_header(torch.device(args.device), "serve_prefix.py", argv),
        "model": args.model,
        "context": args.context,
        "offload": args.offload,
        "host_dtype": args.host_dtype,
        "block_tokens": args.block_tokens,
        "prefix_cache_bytes": args.prefix_cache_bytes,
        "questions": rows,
        "later_vs_first_ttft": ratio,
        "later_vs_first_ttft_without_reuse": plain_ratio,
        "answers_equal_baseline": all(row["same_answer"] for row in rows),
        "ok": ok,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    columns = [
        ("question", "question", ""),
        ("prompt tokens", "prompt_tokens", ""),
        ("reused", "reused_tokens", ""),
        ("TTFT ms", "ttft_ms", ".1f"),
        ("TTFT ms, no reuse", "ttft_baseline_ms", ".1f"),
        ("same answer", "same_answer", ""),
    ]
    print(format_table(rows, columns), file=sys.stderr)
    print(
        f"questions 2..{len(rows)} vs the first (mean TTFT): {ratio if ratio is None else f'{ratio:.3f}'}"
        f" (vs the first without reuse: {plain_ratio if plain_ratio is None else f'{plain_ratio:.3f}'})",
        file=sys.stderr,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
