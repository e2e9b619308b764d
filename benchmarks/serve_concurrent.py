"""How many long requests the server runs at once on one card, against what transformers' own server holds.

Two measurements on the same card and random model, in one process:

- **The peer.** transformers' continuous batching (``generate_batch``, the paged attention the server
  ``transformers serve --continuous-batching`` runs) sizes its paged KV cache from the memory free when it starts.
  One short request runs through it; the growth of the GPU's peak allocation over that run (its cache and its
  activations: an upper bound of its cache) divided by one request's KV (``--context`` tokens, every layer, the
  model's dtype) is how many requests of the context it can hold at once. transformers' own log line about its
  cache is kept in the JSON.
- **omnikv.** The server's :class:`~omnikv_runtime.serve.scheduler.Scheduler` (no HTTP) with as many slots of
  ``--context`` tokens as the memory planner fits beside the weights (``--max-batch auto``'s count); that many
  requests of distinct random prompts are submitted at once. Reported: the most requests that decoded together
  (from their events: first token to last), wall time, GPU peak; then ``--solo`` of the requests (from
  ``--solo-from``) again through ``Engine.generate`` alone, and whether each response's greedy tokens equal it.
  The JSON keeps every response's tokens, so ``--responses`` checks more of them in a later process without
  serving again (a card's call may be too short for the serving and all the solo runs).

    python benchmarks/serve_concurrent.py --context 131072 --new-tokens 512 --offload cpu --out concurrent.json
    python benchmarks/serve_concurrent.py --model tiny --context 512 --slots 3   # the script's check, CPU
    python benchmarks/serve_concurrent.py ... --solo 7 --out a.json; ... --solo 7 --solo-from 7 --responses a.json

Prints one JSON object on stdout (and writes it with ``--out``) and a table on stderr; exits 1 when a request
failed, the rows never all decoded together, or a response differs from its solo ``generate``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import torch

import omnikv_runtime as okv
from omnikv_runtime.planner import ModelGeometry
from omnikv_runtime.serve.requests import ServeRequest
from omnikv_runtime.serve.scheduler import Scheduler
from omnikv_runtime.serve.slot_checks import auto_batch, slot_capacity
from omnikv_runtime.tables import format_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode.py, also under python -P
from decode import random_model, run_header  # noqa: E402
from serve_prefix import build_engine  # noqa: E402

PEER_ATTENTION = ("paged|sdpa", "sdpa_paged", "paged|eager")  # transformers' names for it, newest first


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def peer_capacity(model: Any, context: int) -> dict[str, Any]:
    """How many requests of ``context`` tokens transformers' continuous batching holds at once on this card: the
    peak allocation of one short ``generate_batch`` (its paged cache, sized from the free memory, and its
    activations) over one request's KV."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    geometry = ModelGeometry.from_hf_config(model.config)
    per_request = context * geometry.num_layers * geometry.kv_row_bytes(model.dtype.itemsize)
    lines = _Lines()
    library_logger = logging.getLogger("transformers")
    saved_level = library_logger.level
    library_logger.addHandler(lines)
    library_logger.setLevel(logging.INFO)
    errors = []
    try:
        for attention in PEER_ATTENTION:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            try:
                model.set_attn_implementation(attention)
                model.generate_batch(inputs=[list(range(1, 65))], generation_config=config, progress_bar=False)
            except Exception as exc:  # an older or newer transformers names it otherwise: try the next name
                errors.append(f"{attention}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            torch.cuda.synchronize()
            grown = torch.cuda.max_memory_allocated() - before
            return {
                "attention": attention,
                "peak_growth_bytes": grown,
                "request_kv_bytes": per_request,
                "requests": grown // per_request,
                "transformers_log": [line for line in lines.lines if "cache" in line.lower()][:4],
            }
        return {"error": "; ".join(errors)}
    finally:
        library_logger.removeHandler(lines)
        library_logger.setLevel(saved_level)
        model.set_attn_implementation("sdpa")
        gc.collect()
        torch.cuda.empty_cache()


def prompts(count: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (count, tokens), generator=generator).tolist()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most ``(first token, last event)`` spans open at one time: requests decoding together (the events of
    one turn come in order, so a request that ended in a turn and one that began in the next do not count as
    together)."""
    marks = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = open_now = 0
    for _, change in marks:
        open_now += change
        most = max(most, open_now)
    return most


def first_difference(alone: list[int], together: list[int]) -> int | None:
    """The index of the first new token where two responses differ (None when equal)."""
    for index, (a, b) in enumerate(zip(alone, together)):
        if a != b:
            return index
    return None if len(alone) == len(together) else min(len(alone), len(together))


SAME_SETTINGS = ("model", "context", "new_tokens", "offload", "host_dtype", "batch_invariant", "seed")


def earlier_run(args: argparse.Namespace) -> dict[str, Any]:
    """``--responses``: an earlier run's slots and what it served (read as JSON), after checking that its settings
    are this run's (the prompts follow from them)."""
    with open(args.responses, encoding="utf-8") as handle:
        earlier = json.load(handle)
    if "responses" not in earlier:
        raise SystemExit(f"--responses {args.responses}: no responses in it (a run from before they were kept)")
    for name in SAME_SETTINGS:
        if earlier.get(name) != getattr(args, name):
            theirs, ours = earlier.get(name), getattr(args, name)
            raise SystemExit(
                f"--responses {args.responses}: its {name} is {theirs!r}, this run's {ours!r}; "
                "pass the settings it ran with"
            )
    requests = [
        {"tokens": tokens, "ttft_s": ttft, "error": None}
        for tokens, ttft in zip(earlier["responses"], earlier["ttft_s"], strict=True)
    ]
    served = {
        "requests": requests,
        "wall_s": earlier["wall_s"],
        "most_decoding_together": earlier["served_at_once"],
        "gpu_peak_bytes": earlier["gpu_peak_bytes"],
    }
    return {"slots": earlier["slots"], "served": served}


def serve_at_once(engine: okv.Engine, slots: int, context: int, new_tokens: int, ids: list[list[int]]) -> dict:
    """Every prompt submitted at once to a scheduler of ``slots`` slots; each one's tokens and first-token time,
    the most requests that decoded together, the wall time and the GPU peak."""
    scheduler = Scheduler(engine, max_batch=slots, max_context=context, max_new_tokens=new_tokens)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    results: list[dict[str, Any]] = [{"tokens": [], "first": None, "last": None, "error": None} for _ in ids]
    finished = threading.Semaphore(0)

    def listener(index: int):
        def on_event(event) -> None:
            result = results[index]
            result["last"] = time.perf_counter()
            if result["first"] is None:
                result["first"] = result["last"]
            result["tokens"].extend(event.token_ids)
            if event.error:
                result["error"] = event.error
            if event.finish_reason is not None:
                finished.release()

        return on_event

    scheduler.start()
    started = time.perf_counter()
    try:
        for index, prompt in enumerate(ids):
            scheduler.submit(ServeRequest(f"r{index}", tuple(prompt), new_tokens, temperature=0.0), listener(index))
        for _ in ids:
            if not finished.acquire(timeout=3600):
                raise TimeoutError("a request did not finish within an hour")
        wall = time.perf_counter() - started
    finally:
        scheduler.shutdown()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    together = most_at_once([(r["first"], r["last"]) for r in results if r["first"] is not None])
    for result in results:
        result["ttft_s"] = result.pop("first") - started if result["first"] is not None else None
        del result["last"]
    return {"requests": results, "wall_s": wall, "most_decoding_together": together, "gpu_peak_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("random-llama3-8b", "tiny"), default="random-llama3-8b")
    parser.add_argument("--context", type=int, default=131072, help="tokens a request holds, prompt and new")
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=512,
        help="tokens generated per request (default 512: prefills run one chunk a turn, so the first request must "
        "still be decoding when the last one's prefill ends for all to decode together)",
    )
    parser.add_argument("--slots", type=int, help="default: the planner's count (--max-batch auto)")
    parser.add_argument("--solo", type=int, default=2, help="responses checked against a solo Engine.generate")
    parser.add_argument("--solo-from", type=int, default=0, help="the first request checked (requests are numbered)")
    parser.add_argument(
        "--responses",
        help="an earlier run's JSON: check its responses against solo runs instead of serving again (same settings)",
    )
    parser.add_argument("--offload", choices=("cpu", "none"), default="cpu")
    parser.add_argument("--host-dtype", choices=("auto", "float8_e4m3fn"), default="auto")
    parser.add_argument("--budget", type=float, default=2048, help="omnikv.token_budget")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="prefill.chunk_size")
    parser.add_argument(
        "--batch-invariant", action="store_true", help="generation.batch_invariant: rows' bits whatever the batch"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip transformers' continuous batching")
    parser.add_argument("--device", help="default: cuda when there is one (random-llama3-8b), else cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and args.model != "tiny" else "cpu"
    if args.new_tokens >= args.context:
        parser.error(f"--new-tokens {args.new_tokens} leaves no prompt in --context {args.context}")
    earlier = earlier_run(args) if args.responses else None
    _, model, _, _ = random_model(args.device, args.model == "tiny")
    peer = None
    if not args.no_peer and earlier is None and args.device.startswith("cuda"):
        with torch.inference_mode():
            peer = peer_capacity(model, args.context)
    engine = build_engine(args, model)
    capacity = slot_capacity(engine, args.context, args.new_tokens)
    slots = earlier["slots"] if earlier else args.slots or auto_batch(capacity)
    ids = prompts(slots, args.context - args.new_tokens, model.config.vocab_size, args.seed)
    with torch.inference_mode():
        served = earlier["served"] if earlier else serve_at_once(engine, slots, args.context, args.new_tokens, ids)
        gc.collect()  # the scheduler's slots, before the solo runs allocate their own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        solo, first_differences = [], []
        checked = list(range(args.solo_from, min(args.solo_from + args.solo, slots)))
        for index in checked:
            out = engine.generate(torch.tensor([ids[index]]), max_new_tokens=args.new_tokens, do_sample=False)
            alone, together = out[0, len(ids[index]) :].tolist(), served["requests"][index]["tokens"]
            solo.append(alone == together)
            first_differences.append(first_difference(alone, together))
    failed = [r["error"] for r in served["requests"] if r["error"] or len(r["tokens"]) != args.new_tokens]
    peer_requests = None if peer is None else peer.get("requests")
    result = {
        **run_header(torch.device(args.device), "serve_concurrent.py", argv),
        "model": args.model,
        "seed": args.seed,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "offload": args.offload,
        "host_dtype": args.host_dtype,
        "batch_invariant": args.batch_invariant,
        "slots": slots,
        "planner_slots": capacity.slots,
        "planner_dense_slots": capacity.dense_slots,
        "peer": peer,
        "served_at_once": served["most_decoding_together"],
        "wall_s": served["wall_s"],
        "gpu_peak_bytes": served["gpu_peak_bytes"],
        "ttft_s": [r["ttft_s"] for r in served["requests"]],
        "failed": failed,
        "solo_checked": checked,
        "solo_equal": solo,
        "solo_first_difference": first_differences,
        "vs_peer": slots / peer_requests if peer_requests else None,
        "responses_from": args.responses,
        "responses": [r["tokens"] for r in served["requests"]],
    }
    ok = not failed and served["most_decoding_together"] == slots and all(solo)
    result["ok"] = ok
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    rows = [
        {
            "server": "omnikv serve",
            "requests": slots,
            "at_once": served["most_decoding_together"],
            "peak_gb": (served["gpu_peak_bytes"] or 0) / 1e9,
            "equal_solo": f"{sum(solo)}/{len(solo)}",
            "first_difference": ", ".join("-" if d is None else str(d) for d in first_differences),
        },
        {
            "server": "transformers continuous batching",
            "requests": peer_requests,
            "at_once": None,
            "peak_gb": (peer or {}).get("peak_growth_bytes", 0) / 1e9,
            "equal_solo": None,
            "first_difference": None,
        },
        {
            "server": "dense (planner)",
            "requests": capacity.dense_slots,
            "at_once": None,
            "peak_gb": None,
            "equal_solo": None,
            "first_difference": None,
        },
    ]
    columns = [
        ("server", "server", ""),
        (f"requests of {args.context} tokens", "requests", ""),
        ("decoded together", "at_once", ""),
        ("GPU GB", "peak_gb", ".1f"),
        ("equal solo", "equal_solo", ""),
        ("first different token", "first_difference", ""),
    ]
    print(format_table(rows, columns), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
