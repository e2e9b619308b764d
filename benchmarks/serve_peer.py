"""``omnikv serve`` against transformers' own server (``transformers serve``), one after the other, on the same
card, the same random model and the same client trace.

The trace (seeded, the same for both servers): ``--requests`` arrivals of a Poisson process of ``--rate``
requests a second; each prompt's length drawn from ``--prompt-tokens`` (``LOW..HIGH``) and its new tokens
from ``--new-tokens``; a ``--shared-fraction`` of them begin with the first tokens of one seeded document of
``--document-tokens`` tokens (the rest of the prompt, its question, is its own: a sixteenth of the prompt,
at least one token), the others are their own throughout. Every request is a streamed greedy
``/v1/completions`` through the official ``openai`` client, sent at its arrival time whatever is still
running (an open loop), with ``stream_options.include_usage``.

The model: ``--model random-llama3-8b`` (Llama-3-8B's geometry, random bf16 weights, seed 0) or ``tiny`` (a
small Llama, float32, for the CPU check), saved with ``save_pretrained`` to a temporary folder beside a
word-level tokenizer (``"w17 w9"`` <-> ids 17, 9: a prompt of N words is N tokens for both servers; no
hub access). Each server runs in a process of its own on a free loopback port, from that folder:

- ``omnikv serve`` with a config of the folder, OmniKV's filter layers, ``--offload`` and ``--host-dtype``,
  ``--max-batch`` (default ``auto``: as many slots as the memory planner fits), a context of the
  longest request, ``--prefix-cache-bytes`` (on CUDA 8e9 by default) and ``--max-prefill-tokens``;
- ``transformers serve FOLDER --continuous-batching --attn-implementation A`` (A: ``flash_attention_2``
  where ``flash_attn`` imports, else ``sdpa``; on the CPU with ``--cb-num-blocks`` sized to the trace, since
  its default takes a share of all host memory), plus each ``--peer-arg``.

Each server gets one short warm-up request before the trace (not counted). Reported per server:
generated tokens a second over the window (the completed requests' tokens, from the first request sent to
the last one done), TTFT and time between streamed tokens (p50, p99), the peak memory the server's process
took above what was in use before it started (the card's ``memory.used`` from ``nvidia-smi`` on CUDA, the
resident memory of its processes on the CPU, sampled every 0.2 s), requests completed and the requests it
did not serve: errors (HTTP or stream errors, a server that did not start or died) and timeouts (not done
``--drain-cap`` seconds after the last arrival), each counted, never dropped; and (``said``) its log's lines
on its KV capacity (``omnikv serve``'s start line: how many requests of its context fit, and how many a dense
server would hold; transformers' memory for its cache). Then omnikv's throughput and TTFT p99 as ratios to
the peer's, and on how many requests both servers gave the same words. ``--logs`` keeps the servers' logs.

    python benchmarks/serve_peer.py --model tiny --device cpu --requests 4 --rate 20 \\
        --prompt-tokens 64..128 --new-tokens 4..8 --document-tokens 128
    python benchmarks/serve_peer.py --model random-llama3-8b --requests 16 --rate 0.5 \\
        --prompt-tokens 8192..32768 --new-tokens 128..256 --shared-fraction 0.5 --out serve_peer.json

Prints one JSON object on stdout (and writes it with ``--out``) and a Markdown table on stderr. Exits 1
when ``omnikv serve`` left a request unserved or did not start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from typing import Any

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode.py, serve_load.py, also under python -P
from decode import random_model, run_header  # noqa: E402
from serve_load import ms, percentile, write  # noqa: E402
from server_processes import SERVERS, PeakMemory, ServerProcess, peer_available  # noqa: E402

from omnikv_runtime.geometry import ModelGeometry  # noqa: E402
from omnikv_runtime.tables import format_table  # noqa: E402

WARMUP_TOKENS = (16, 4)  # the warm-up request's prompt and new tokens
DETAILS = 10  # unserved requests listed in the JSON at most
MARKER = "serve_peer_model.json"  # in a model folder: which model it holds
LOG_NOTES = {"omnikv": "capacity: ", "transformers": "for cache allocation"}  # a server's log lines kept in its row


# the trace --------------------------------------------------------------------------------------------------
def token_range(text: str) -> tuple[int, int]:
    """argparse type: ``LOW..HIGH`` (or one number) of tokens, 1 <= LOW <= HIGH."""
    low, _, high = text.partition("..")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW..HIGH tokens (e.g. 8192..32768), got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return bounds


def make_trace(
    seed: int,
    requests: int,
    rate: float,
    prompt_tokens: tuple[int, int],
    new_tokens: tuple[int, int],
    shared_fraction: float,
    document_tokens: int,
    vocab: int,
) -> list[dict[str, Any]]:
    """The requests of the trace (see the module docstring), in arrival order: ``arrival_s`` (the first at 0),
    ``prompt_ids``, ``new_tokens`` and ``shared_tokens`` (how many of its first tokens are the document's)."""
    rng = random.Random(seed)
    document = [rng.randrange(1, vocab) for _ in range(document_tokens)]
    trace, arrival = [], 0.0
    for index in range(requests):
        if index:
            arrival += rng.expovariate(rate)
        length, new = rng.randint(*prompt_tokens), rng.randint(*new_tokens)
        shared = min(document_tokens, length - max(1, length // 16)) if rng.random() < shared_fraction else 0
        own = random.Random(f"{seed}/{index}")
        ids = document[:shared] + [own.randrange(1, vocab) for _ in range(length - shared)]
        trace.append(
            {"index": index, "arrival_s": arrival, "prompt_ids": ids, "new_tokens": new, "shared_tokens": shared}
        )
    return trace


def prompt_text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


# the model folder -------------------------------------------------------------------------------------------
def word_tokenizer(vocab: int) -> Any:
    """A tokenizer of ``w<id>`` words, one token each, no special tokens: ``"w17 w9"`` <-> ``[17, 9]``. Each
    token holds its leading space (``"\u2581w17"``), as byte-level BPE and SentencePiece entries do: a server
    that bounds a text's tokens by its characters over the longest entry (``omnikv serve`` does) counts right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    space = "\u2581"
    words = Tokenizer(models.WordLevel({f"{space}w{i}": i for i in range(vocab)}, unk_token=f"{space}w0"))
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always")
    words.decoder = decoders.Metaspace(replacement=space, prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token=f"{space}w0")


def save_model(folder: str, model_name: str, device: str, positions: int) -> dict[str, Any]:
    """The random model (seed 0) and its word tokenizer, saved to ``folder`` (kept there: a folder that holds
    this very model already, as its ``MARKER`` file says, is used as it is); its description."""
    tiny = model_name == "tiny"
    dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"  # decode.random_model's choice
    wanted = {"model": model_name, "dtype": dtype, "positions": positions}
    marker = os.path.join(folder, MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            kept = json.load(handle)
        if {key: kept.get(key) for key in wanted} == wanted:
            return kept["description"]
    _, model, config, _ = random_model(device, tiny)
    config.max_position_embeddings = positions  # random weights: no trained limit; the servers read this one
    model.generation_config.eos_token_id = None  # never stops early: every request generates its new tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    geometry = ModelGeometry.from_hf_config(config)
    word_tokenizer(geometry.vocab).save_pretrained(folder)
    description = {
        "geometry": f"{'tiny Llama' if tiny else 'Llama-3-8B'} (random {dtype} weights)",
        "dtype": dtype,
        "vocab": geometry.vocab,
        "layers": geometry.num_layers,
    }
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({**wanted, "description": description}, handle)
    return description


# one server's run -------------------------------------------------------------------------------------------
def drive(url: str, model: str, trace: list[dict[str, Any]], timeout: float, drain_cap: float) -> list[dict]:
    """Send the trace at its arrival times (a thread a request); each request's record, in trace order."""
    import openai
    from serve_load import streamed_completion

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout)
    records = [{"index": entry["index"], "expected_tokens": entry["new_tokens"]} for entry in trace]
    threads = []
    start = time.perf_counter()
    for entry, record in zip(trace, records):
        time.sleep(max(0.0, start + entry["arrival_s"] - time.perf_counter()))
        args = (client, model, prompt_text(entry["prompt_ids"]), entry["new_tokens"], record, True)
        thread = threading.Thread(target=streamed_completion, args=args, daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.perf_counter() + drain_cap
    done = []
    for thread, record, entry in zip(threads, records, trace):
        thread.join(timeout=max(0.0, deadline - time.perf_counter()))
        if thread.is_alive():  # its stream ends when the server stops; its record may still change: not read
            record = {"index": entry["index"], "expected_tokens": entry["new_tokens"]}
            record["timeout"] = f"not done {drain_cap:g} s after the last arrival"
        done.append(record)
    return done


def tokens_of(record: dict[str, Any]) -> int:
    """Generated tokens: the usage's count, else the words of the text (one token each)."""
    return record.get("usage", {}).get("completion", len(record.get("text", "").split()))


def summarize(name: str, records: list[dict], memory: dict[str, Any], failure: str | None) -> dict[str, Any]:
    """One server's row: throughput over the window, latencies, memory, requests served and not."""

    def unserved_why(record: dict[str, Any]) -> str | None:
        if failure is not None:
            return failure
        if "timeout" in record:
            return "timeout: " + record["timeout"]
        if "error" in record:
            return "error: " + record["error"]
        if record.get("finish_reason") not in ("stop", "length"):
            return f"error: the stream ended without a finish reason ({record.get('finish_reason')})"
        return None

    reasons = {record["index"]: unserved_why(record) for record in records}
    done = [record for record in records if reasons[record["index"]] is None]
    started = [record["started"] for record in records if "started" in record]
    window = max(record["ended"] for record in done) - min(started) if done else 0.0
    generated = sum(tokens_of(record) for record in done)
    ttft = [record["chunks"][0] - record["started"] for record in done if record["chunks"]]
    tbt = [b - a for record in done for a, b in zip(record["chunks"], record["chunks"][1:])]
    unserved = [(index, why) for index, why in reasons.items() if why is not None]
    return {
        "server": name,
        "requests": len(records),
        "completed": len(done),
        "errors": sum(1 for _, why in unserved if not why.startswith("timeout")),
        "timeouts": sum(1 for _, why in unserved if why.startswith("timeout")),
        "generated_tokens": generated,
        "short": sum(1 for record in done if tokens_of(record) != record["expected_tokens"]),
        "seconds": round(window, 2),
        "tokens_per_s": round(generated / window, 2) if window else 0.0,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "tbt_p50_ms": ms(percentile(tbt, 50)),
        "tbt_p99_ms": ms(percentile(tbt, 99)),
        **memory,
        "unserved": [{"index": index, "why": why} for index, why in unserved[:DETAILS]],
        "texts": {record["index"]: tuple(record["text"].split()) for record in done},  # the words: the tokens
    }


def run_server(name: str, server: ServerProcess, trace: list[dict], args, device: str) -> dict[str, Any]:
    """Start the server, warm it up, send the trace, stop it; its row (a server that does not start, or dies,
    leaves every request of the trace unserved, with the reason)."""
    memory = PeakMemory(device)
    memory.start(server)
    failure, records, warmup_s = None, [{"index": e["index"], "expected_tokens": e["new_tokens"]} for e in trace], None
    began = time.perf_counter()
    start_s = stop_s = died = None
    try:
        server.start(args.start_timeout)
        start_s = round(time.perf_counter() - began, 2)
        warm = drive(server.url, server.model_name, warmup_trace(trace), args.request_timeout, args.request_timeout)
        warmup_s = round(warm[0]["ended"] - warm[0]["started"], 2) if "ended" in warm[0] else None
        print(f"{name}: ready in {start_s} s; warm-up {warmup_s} s; sending {len(trace)} requests", file=sys.stderr)
        records = drive(server.url, server.model_name, trace, args.request_timeout, args.drain_cap)
        if not server.alive():  # its requests' own errors count what it did not serve
            died = f"exit status {server.returncode()}: {server.log_tail()}"
            print(f"{name}: the server died during the trace ({died})", file=sys.stderr)
    except RuntimeError as exc:  # it did not start
        failure = f"error: {exc}"
        print(f"{name}: {exc}", file=sys.stderr)
    finally:
        stopping = time.perf_counter()
        server.stop()
        stop_s = round(time.perf_counter() - stopping, 2)
        peak = memory.stop()
    row = summarize(name, records, peak, failure)
    row.update(start_s=start_s, warmup_s=warmup_s, stop_s=stop_s, died=died, command=" ".join(server.command))
    row["said"] = server.log_lines(LOG_NOTES[name]) if os.path.isfile(server.log_path) else []
    return row


def agreement(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Requests every server completed, and of those how many got the same text from each (the same greedy model:
    they differ only where the servers' arithmetic rounds differently). Takes the rows' texts out, leaving in each
    row a digest of each completed request's words (``text_digests``: request index -> the first 16 hex digits
    of SHA-256), so that servers run in separate calls can be compared from their JSON."""
    texts = [row.pop("texts") for row in rows]
    for row, each in zip(rows, texts, strict=True):
        row["text_digests"] = {
            index: hashlib.sha256(" ".join(words).encode()).hexdigest()[:16] for index, words in each.items()
        }
    common = set.intersection(*(set(each) for each in texts)) if texts else set()
    return {"compared": len(common), "equal": sum(1 for i in common if len({each[i] for each in texts}) == 1)}


def warmup_trace(trace: list[dict]) -> list[dict]:
    prompt, new = WARMUP_TOKENS
    return [{"index": -1, "arrival_s": 0.0, "prompt_ids": trace[0]["prompt_ids"][-prompt:], "new_tokens": new}]


def ratio(ours: dict[str, Any], peer: dict[str, Any], key: str) -> float | None:
    """omnikv's figure over the peer's; None where either has none (nothing served)."""
    return round(ours[key] / peer[key], 3) if ours.get(key) and peer.get(key) else None


# the command ------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["random-llama3-8b", "tiny"], default="random-llama3-8b")
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.5, help="arrivals a second (Poisson)")
    parser.add_argument("--prompt-tokens", type=token_range, default=(8192, 32768), help="LOW..HIGH")
    parser.add_argument("--new-tokens", type=token_range, default=(128, 256), help="LOW..HIGH")
    parser.add_argument("--shared-fraction", type=float, default=0.5, help="requests that begin with the document")
    parser.add_argument("--document-tokens", type=int, default=None, help="default: the longest prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--servers", default="omnikv,transformers", help="which to run, in this order")
    parser.add_argument("--max-batch", default="auto", help="omnikv serve --max-batch (a number or auto)")
    parser.add_argument("--offload", choices=["cpu", "none"], default="cpu", help="omnikv: offload.device")
    parser.add_argument("--host-dtype", choices=["auto", "float8_e4m3fn"], default="auto", help="omnikv's host tier")
    parser.add_argument("--budget", type=int, default=2048, help="omnikv: omnikv.token_budget")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="omnikv: prefill.chunk_size")
    parser.add_argument(
        "--prefix-cache-bytes",
        type=int,
        help="omnikv serve --prefix-cache-bytes (default on CUDA 8e9: a 32K-token document's blocks at "
        "Llama-3-8B's geometry, with room, as transformers serve shares prefix blocks by default; on the CPU 0)",
    )
    parser.add_argument("--max-prefill-tokens", type=int, help="omnikv serve --max-prefill-tokens (default: its own)")
    parser.add_argument("--attn", default=None, help="the peer's --attn-implementation (default: the best here)")
    parser.add_argument("--peer-arg", action="append", default=[], help="one more argument for transformers serve")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to answer")
    parser.add_argument("--request-timeout", type=float, default=1800.0, help="the client's timeout a request")
    parser.add_argument("--drain-cap", type=float, default=900.0, help="seconds after the last arrival")
    parser.add_argument(
        "--model-folder", help="save the model here and keep it, or use the one saved there (default: a temporary one)"
    )
    parser.add_argument("--logs", help="write the servers' logs into this folder (default: a temporary one)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.requests < 1 or not args.rate > 0 or not 0 <= args.shared_fraction <= 1:
        parser.error("--requests of at least 1, --rate above 0, --shared-fraction from 0 to 1")
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in args.servers if name not in SERVERS]
    if unknown or not args.servers:
        parser.error(f"--servers: {unknown or 'none'} not among {sorted(SERVERS)}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.prefix_cache_bytes is None:
        args.prefix_cache_bytes = 8 * 10**9 if args.device.startswith("cuda") else 0
    args.document_tokens = args.document_tokens or args.prompt_tokens[1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    context = args.prompt_tokens[1] + args.new_tokens[1]
    positions = -(-context // 256) * 256
    result: dict[str, Any] = {**run_header(torch.device(args.device), "serve_peer.py", argv)}
    result["transformers"] = transformers.__version__  # the peer's
    with tempfile.TemporaryDirectory(prefix="serve_peer_") as folder:
        model_folder = args.model_folder or os.path.join(folder, "model")
        result["model"] = save_model(model_folder, args.model, args.device, positions)
        trace = make_trace(
            args.seed,
            args.requests,
            args.rate,
            args.prompt_tokens,
            args.new_tokens,
            args.shared_fraction,
            args.document_tokens,
            result["model"]["vocab"],
        )
        lengths = [len(entry["prompt_ids"]) for entry in trace]
        result["trace"] = {
            "requests": len(trace),
            "rate": args.rate,
            "seed": args.seed,
            "last_arrival_s": round(trace[-1]["arrival_s"], 2),
            "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths))},
            "new_tokens": sum(entry["new_tokens"] for entry in trace),
            "sharing_the_document": sum(1 for entry in trace if entry["shared_tokens"]),
            "document_tokens": args.document_tokens,
        }
        settings = {**vars(args), "context": context, "prompt_tokens": list(args.prompt_tokens)}
        settings["new_tokens"] = list(args.new_tokens)
        result["settings"] = settings
        print(f"model saved: {result['model']['geometry']}; trace: {result['trace']}", file=sys.stderr)
        rows = []
        for name in args.servers:
            if name == "transformers" and (missing := peer_available()) is not None:
                row = summarize(name, [{"index": e["index"], "expected_tokens": 0} for e in trace], {}, missing)
                rows.append(row)
                continue
            server = SERVERS[name](model_folder, args, context, result["model"]["dtype"], trace, folder)
            rows.append(run_server(name, server, trace, args, args.device))
    result["same_text"] = agreement(rows)
    result["servers"] = rows
    by_name = {row["server"]: row for row in rows}
    ours, peer = by_name.get("omnikv"), by_name.get("transformers")
    if ours and peer:
        result["ratios"] = {
            "tokens_per_s": ratio(ours, peer, "tokens_per_s"),
            "ttft_p99": ratio(ours, peer, "ttft_p99_ms"),
        }
    print(json.dumps(result, indent=1))
    write(args.out, result)
    columns = [
        ("server", "server", ""),
        ("completed", "completed", ""),
        ("errors", "errors", ""),
        ("timeouts", "timeouts", ""),
        ("tokens", "generated_tokens", ""),
        ("tokens/s", "tokens_per_s", ".1f"),
        ("TTFT p50 ms", "ttft_p50_ms", ".0f"),
        ("TTFT p99 ms", "ttft_p99_ms", ".0f"),
        ("TBT p50 ms", "tbt_p50_ms", ".1f"),
        ("TBT p99 ms", "tbt_p99_ms", ".1f"),
        ("peak MiB", "peak_memory_mib", ".0f"),
    ]
    print(format_table(rows, columns, markdown=True), file=sys.stderr)
    if "ratios" in result:
        ratios = result["ratios"]
        print(
            f"omnikv / transformers: tokens/s x{ratios['tokens_per_s']}, TTFT p99 x{ratios['ttft_p99']}",
            file=sys.stderr,
        )
    for row in rows:
        for item in row["unserved"]:
            print(f"{row['server']}: request {item['index']} not served: {item['why']}", file=sys.stderr)
    same = result["same_text"]
    print(f"same text from every server: {same['equal']} of the {same['compared']} all completed", file=sys.stderr)
    return 0 if ours is None or ours["completed"] == ours["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
