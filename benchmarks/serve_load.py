"""Load test of ``omnikv serve`` on loopback, against sequential ``Engine.generate`` in the same process.

The real server (``omnikv_runtime.serve.app`` over a real :class:`Scheduler`) runs under uvicorn on a
free loopback port in this process. A second process runs ``--clients`` client streams with the
official ``openai`` client: each sends streamed ``/v1/completions`` requests back to back (greedy,
``--max-tokens`` new tokens, a prompt of ``--prompt-tokens`` tokens, distinct per request, drawn from a
seed) for ``--seconds`` seconds, then waits for its request in flight (at most ``--drain-cap`` seconds).
One warm-up request goes first, outside the window (kernels compiled, the step recorded).

Reported: requests completed, output tokens/s over the window (first request sent to last response
done), p50/p99 time to first token and time between streamed chunks, and lost or corrupted
responses. Every response must end with a ``finish_reason`` and its text must equal what the same
prompt gets from sequential greedy ``Engine.generate``. That reference runs after the server stops,
one prompt at a time through the engine's own decode loop, and its tokens/s is the baseline:
the server's throughput is reported as a ratio to it, beside the most any server could gain over it on this
mix (``prefill_bound``: generate's time a request over its prefill time, the ratio a server would reach if
its decode steps cost nothing, since every request's prompt must still be prefilled). Before the server
stops, ``--solo`` of the window's prompts are sent again one at a time: the text must not depend on the
batch's company.

Models: ``--model bundled`` is SmolLM2-135M-Instruct on the CPU (prompts of single-token words, so a
prompt of N words is N tokens). ``--model random-llama3-8b`` is the Llama-3-8B geometry with random
bf16 weights on the GPU (``--tiny``: a small Llama, float32 on the CPU, to check the script). A
random model has no tokenizer: :class:`WordTokenizer` maps ``"w17 w9 ..."`` to ids and back.

    python benchmarks/serve_load.py --model bundled --clients 8 --seconds 60 --prompt-tokens 200 --max-tokens 32
    python benchmarks/serve_load.py --model random-llama3-8b --clients 8 --max-batch 8 --seconds 90 \\
        --prompt-tokens 32768 --max-tokens 64 --offload cpu --out serve.json

Under tensor parallelism, every rank runs the script (``torchrun --nproc-per-node N benchmarks/serve_load.py
...``, ``distributed.tp_size = N``): rank 0 serves and runs the clients, the other ranks' schedulers follow
its turns, then every rank runs the sequential ``Engine.generate`` pass on the prompts rank 0 names.

Prints one JSON object on stdout (and writes it with ``--out``) and a table on stderr. Exits 1 when
any response is lost or differs from the reference (``--inject corrupt|lose`` breaks some on
purpose, to check that this shows).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import socket
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

import omnikv_runtime as okv
from omnikv_runtime.distributed import leave_process_group
from omnikv_runtime.tables import format_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode.py, also under python -P
from decode import FILTER_LAYERS, random_model, run_header  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAMES = {"bundled": "smollm2-135m", "random-llama3-8b": "random-llama3-8b"}
WARMUP_CLIENT = -1  # the warm-up prompts' client index (outside the window, not checked)
DETAILS = 10  # lost / mismatched requests listed in the JSON at most


class WordTokenizer:
    """The random model's tokenizer: text ``"w17 w9 w3"`` <-> ids ``[17, 9, 3]``; no special tokens.

    What the server (encode, incremental decode, EOS lookup) and ``Engine.generate`` (pad id) call."""

    eos_token_id = None
    bos_token_id = None
    pad_token_id = 0
    chat_template = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def _id(self, word: str) -> int:
        if not (word.startswith("w") and word[1:].isdigit() and int(word[1:]) < self.vocab_size):
            raise ValueError(f"not a word of this tokenizer: {word[:20]!r}")
        return int(word[1:])

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None, **_: Any):
        ids = [self._id(word) for word in text.split()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return " ".join(f"w{int(i)}" for i in ids)


def prompt_text(words: list[str] | None, vocab: int, tokens: int, seed: int, client: int, index: int) -> str:
    """Request ``index`` of ``client``: ``tokens`` words drawn from the seed (single-token words of the
    bundled tokenizer, or ``w<id>`` for the word tokenizer)."""
    rng = random.Random(f"{seed}/{client}/{index}")
    if words:
        return "".join(" " + rng.choice(words) for _ in range(tokens))
    return " ".join(f"w{rng.randrange(1, vocab)}" for _ in range(tokens))


def single_token_words(tokenizer: Any, count: int = 3000) -> list[str]:
    """Lower-case words that are one token each with their leading space (so N of them are N tokens)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = []
    for token, index in vocab:
        word = token[1:]
        if token.startswith("\u0120") and word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 9:
            if tokenizer(" " + word, add_special_tokens=False)["input_ids"] == [index]:
                words.append(word)
                if len(words) == count:
                    break
    return words


# the client process ---------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def one_request(client: Any, spec: dict[str, Any], client_index: int, index: int) -> dict[str, Any]:
    """One streamed completion of the request's prompt (see :func:`streamed_completion`)."""
    prompt = prompt_text(spec["words"], spec["vocab"], spec["prompt_tokens"], spec["seed"], client_index, index)
    record: dict[str, Any] = {"client": client_index, "index": index}
    return streamed_completion(client, spec["model"], prompt, spec["max_tokens"], record)


def streamed_completion(
    client: Any, model: str, prompt: str, max_tokens: int, record: dict[str, Any], usage: bool = False
) -> dict[str, Any]:
    """One streamed greedy completion, into ``record``: its text, finish reason, usage (asked for with ``usage``),
    the time of each text chunk, when it started and ended, and the error that lost it, if any."""
    record["chunks"] = []
    record["started"] = time.perf_counter()
    texts = []
    options = {"stream_options": {"include_usage": True}} if usage else {}
    try:
        stream = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, **options
        )
        for chunk in stream:
            if chunk.usage is not None:
                record["usage"] = {"prompt": chunk.usage.prompt_tokens, "completion": chunk.usage.completion_tokens}
            for choice in chunk.choices:
                if choice.text:
                    record["chunks"].append(time.perf_counter())
                    texts.append(choice.text)
                if choice.finish_reason is not None:
                    record["finish_reason"] = choice.finish_reason
    except Exception as exc:  # a lost response: counted, and said which
        record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    record["ended"] = time.perf_counter()
    record["text"] = "".join(texts)
    return record


def client_process(spec: dict[str, Any], connection: Any) -> None:
    """The clients: a warm-up, then ``clients`` threads for ``seconds``; the records go back through ``connection``."""
    import openai

    def new_client():
        timeout = spec["seconds"] + spec["drain_cap"] + 60
        return openai.OpenAI(base_url=spec["base_url"], api_key="unused", max_retries=0, timeout=timeout)

    warm_client = new_client()
    warm = [one_request(warm_client, spec, WARMUP_CLIENT, i) for i in range(spec["warmup"])]
    records: list[dict[str, Any]] = []
    in_flight: dict[int, tuple[int, float]] = {}
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + spec["seconds"]

    def run(client_index: int) -> None:
        client = new_client()
        index = 0
        while time.perf_counter() < stop_at:
            with lock:
                in_flight[client_index] = (index, time.perf_counter())
            record = one_request(client, spec, client_index, index)
            with lock:
                records.append(record)
                del in_flight[client_index]
            index += 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(spec["clients"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, stop_at + spec["drain_cap"] - time.perf_counter()))
    with lock:  # what is still running past the hard cap is lost
        for client_index, (index, started) in in_flight.items():
            records.append(
                {
                    "client": client_index,
                    "index": index,
                    "started": started,
                    "ended": time.perf_counter(),
                    "chunks": [],
                    "text": "",
                    "error": f"not finished {spec['drain_cap']} s after the window closed",
                }
            )
        result = {"warmup": warm, "records": list(records), "start": start, "stop_at": stop_at}
    connection.send(result)
    connection.close()
    os._exit(0)  # threads stuck in a read must not keep the process alive


# the server and the engine ----------------------------------------------------------------------------
def build(args, world: int) -> tuple[Any, Any, list[str] | None, int, torch.device]:
    """The engine (over ``world`` tensor-parallel ranks), its tokenizer, the prompt words (bundled) and the
    vocabulary size."""
    config: dict[str, Any]
    if args.model == "bundled":
        from omnikv_runtime.models import load_model

        model, tokenizer = load_model("smollm2-135m")
        with open(os.path.join(ROOT, "configs", "default.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        words = single_token_words(tokenizer)
        device = torch.device("cpu")
    else:
        device, model, _, _ = random_model(args.device, args.tiny)
        if args.dtype:
            model.to(getattr(torch, args.dtype))
        model.generation_config.eos_token_id = None  # random weights: never stop early
        model.generation_config.pad_token_id = 0
        tokenizer = WordTokenizer(model.config.vocab_size)
        config = {"omnikv": {"filter_layers": FILTER_LAYERS, "wait_layers": 1, "token_budget": 2048}}
        words = None
    config.setdefault("offload", {})["device"] = args.offload
    if args.budget is not None:
        config["omnikv"]["token_budget"] = args.budget
    if args.prefill_chunk is not None:
        config.setdefault("prefill", {})["chunk_size"] = args.prefill_chunk
    config["distributed"] = {"tp_size": world}
    engine = okv.initialize(model, config, tokenizer=tokenizer)
    return engine, tokenizer, words, model.config.vocab_size, device


class Inject:
    """Faults put in on purpose (``--inject``): the check must then fail."""

    @staticmethod
    def corrupt(scheduler: Any) -> None:
        """The server's text is upper-cased from a request's second token on (the reference's is not)."""
        real = scheduler.tokenizer

        class Corrupting:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                return real(*args, **kwargs)

            def decode(self, ids: Any, **kwargs: Any) -> str:
                text = real.decode(ids, **kwargs)
                return text.upper() if len(ids) >= 2 else text

        scheduler.tokenizer = Corrupting()

    @staticmethod
    def lose(scheduler: Any) -> None:
        """Every fourth request is cancelled by the server shortly after it is submitted."""
        submit, count = scheduler.submit, [0]

        def submitting(request: Any, on_event: Any) -> Any:
            handle = submit(request, on_event)
            count[0] += 1
            if count[0] % 4 == 0:
                threading.Timer(0.05, handle.cancel).start()
            return handle

        scheduler.submit = submitting


class Server:
    """The app over a real Scheduler under uvicorn, on a free loopback port, in a thread of this process."""

    def __init__(self, engine: Any, args, context: int, name: str) -> None:
        import uvicorn

        from omnikv_runtime.serve.app import create_app
        from omnikv_runtime.serve.scheduler import Scheduler

        self.scheduler = Scheduler(
            engine,
            max_batch=args.max_batch,
            max_queue=64,
            max_context=context,
            max_prefill_tokens=args.max_prefill_tokens,
        )
        if args.inject:
            getattr(Inject, args.inject)(self.scheduler)
        app = create_app(self.scheduler, name)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.live = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.live.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.samples: list[dict[str, int]] = []
        self._sampling = threading.Event()

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.live.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def sample(self, every: float = 0.25) -> None:
        """Record the batch's size and the queue's depth every ``every`` seconds until :meth:`stop`."""

        def loop() -> None:
            while not self._sampling.wait(every):
                metrics = self.scheduler.metrics()
                running, queued = metrics["requests_running"], metrics["queue_depth"]
                self.samples.append({"running": running, "queued": queued, "batch": metrics["batch_size"]})

        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> dict[str, Any]:
        self._sampling.set()
        metrics = self.scheduler.metrics()
        self.live.should_exit = True
        self.thread.join(timeout=60)
        if self.thread.is_alive():
            raise RuntimeError("the server did not stop within 60 s")
        self.scheduler.shutdown()  # the lifespan did; with several ranks this is where the others stop following
        return {
            "generation_tokens_total": metrics["generation_tokens_total"],
            "prompt_tokens_total": metrics["prompt_tokens_total"],
            "requests_total": metrics["requests_total"],
            "pcie_bytes_total": metrics["pcie_bytes_total"],
            "prefill_tokens_total": metrics.get("prefill_tokens_total"),
            "prefill_forwards_total": metrics.get("prefill_forwards_total"),
            "turns_total": metrics.get("turns_total"),
            "graph_captures": self.scheduler.batch.captures,
        }


def solo_pass(spec: dict[str, Any], records: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """``count`` of the window's complete requests (spread over the window) again through the same server,
    one at a time: the batch's company must not change a request's text."""
    import openai

    done = sorted((r for r in records if r.get("finish_reason") and not r.get("error")), key=lambda r: r["started"])
    picked = done[:: max(1, len(done) // count)][:count] if count and done else []
    client = openai.OpenAI(base_url=spec["base_url"], api_key="unused", max_retries=0, timeout=600)
    out = []
    for record in picked:
        again = one_request(client, spec, record["client"], record["index"])
        again["loaded_text"] = record["text"]
        out.append(again)
    return out


def run_clients(spec: dict[str, Any]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=client_process, args=(spec, sender), daemon=True)
    process.start()
    sender.close()
    limit = time.monotonic() + spec["seconds"] + spec["drain_cap"] + 600  # and the warm-up, the process's start
    while not receiver.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"the client process ended (exit code {process.exitcode}) without its records")
        if time.monotonic() > limit:
            process.kill()
            raise RuntimeError("the client process sent nothing in time")
    result = receiver.recv()
    process.join(timeout=30)
    return result


def reference(engine: Any, tokenizer: Any, text: str, max_tokens: int, device: torch.device) -> tuple[str, float, dict]:
    """What sequential greedy ``Engine.generate`` answers ``text`` (tokenized as the server does), and its time."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = engine.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1] :].tolist()
    stats = engine.stats()
    timing = {
        "tokens": len(new),
        "prefill_s": stats.get("prefill_seconds"),
        "step_ms": stats["decode_seconds"] / stats["decode_steps"] * 1e3 if stats.get("decode_steps") else None,
    }
    return tokenizer.decode(new, skip_special_tokens=True), seconds, timing


def share_prompt(pair: tuple[int, int] | None, device: torch.device) -> tuple[int, int] | None:
    """With several ranks, rank 0's next prompt of the sequential pass, ``(client, index)``, or None when the
    pass ends: every rank runs ``Engine.generate`` on it (its collectives need every rank). One rank: ``pair``."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return pair
    message = torch.tensor([*(pair or (0, 0)), pair is not None], dtype=torch.long, device=device)
    dist.broadcast(message, 0)
    client, index, more = message.tolist()
    return (client, index) if more else None


def follow(engine: Any, tokenizer: Any, args, context: int, words: list[str] | None, vocab: int) -> int:
    """A rank other than 0: its scheduler follows rank 0's through the load, then the sequential pass."""
    from omnikv_runtime.serve.scheduler import Scheduler

    Scheduler(
        engine, max_batch=args.max_batch, max_queue=64, max_context=context, max_prefill_tokens=args.max_prefill_tokens
    ).follow()
    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    while (pair := share_prompt(None, engine.device)) is not None:
        text = prompt_text(words, vocab, args.prompt_tokens, args.seed, *pair)
        reference(engine, tokenizer, text, args.max_tokens, engine.device)
    leave_process_group()
    return 0


def write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_NAMES), default="bundled")
    parser.add_argument("--tiny", action="store_true", help="random-llama3-8b: a small Llama instead (script check)")
    parser.add_argument("--device", default=None, help="random model's device (default: cuda if there is one)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client streams")
    parser.add_argument("--seconds", type=float, default=60.0, help="the load window: no new request after it")
    parser.add_argument("--drain-cap", type=float, default=120.0, help="seconds to wait for requests in flight")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--max-batch", type=int, default=8, help="the scheduler's slots")
    parser.add_argument(
        "--max-context", type=int, default=None, help="the server's context per request (default: prompt + max tokens)"
    )
    parser.add_argument("--offload", choices=["cpu", "none"], default="cpu", help="offload.device")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill.chunk_size (default: the config's)")
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="the server's prompt tokens per turn (default: prefill.chunk_size)",
    )
    parser.add_argument("--budget", type=float, default=None, help="omnikv.token_budget (default: the config's)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="random model's dtype (default: bf16 on CUDA, else float32)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="requests before the window (not counted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--baseline-cap", type=float, default=None, help="stop the sequential pass after this many seconds"
    )
    parser.add_argument(
        "--solo",
        type=int,
        default=8,
        help="send this many of the window's prompts again, one at a time, before the server stops; "
        "their text must not change (the batch's company must not matter)",
    )
    parser.add_argument("--inject", choices=["corrupt", "lose"], help="break some responses on purpose")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget >= 1:
        args.budget = int(args.budget)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and args.device == "cuda":  # each rank builds the model on its own GPU; DeepSpeed keeps its shard
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(torch.device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    engine, tokenizer, words, vocab, device = build(args, world)
    name = MODEL_NAMES[args.model]
    sample_ids = tokenizer(prompt_text(words, vocab, args.prompt_tokens, args.seed, 0, 0))["input_ids"]
    context = args.max_context or len(sample_ids) + args.max_tokens
    if rank != 0:
        return follow(engine, tokenizer, args, context, words, vocab)
    result: dict[str, Any] = {
        **run_header(device, "serve_load.py", argv),
        "model": name,
        "geometry": (
            "SmolLM2-135M-Instruct (bundled, float32)"
            if args.model == "bundled"
            else f"{'tiny Llama' if args.tiny else 'Llama-3-8B'} (random {str(engine.model.dtype)[6:]} weights)"
        ),
        "settings": {
            "threads": torch.get_num_threads(),
            "clients": args.clients,
            "seconds": args.seconds,
            "prompt_tokens": len(sample_ids),
            "max_tokens": args.max_tokens,
            "max_batch": args.max_batch,
            "max_context": context,
            "offload": args.offload,
            "prefill_chunk": engine.config.prefill.chunk_size,
            "max_prefill_tokens": args.max_prefill_tokens or engine.config.prefill.chunk_size,
            "budget": engine.config.omnikv.token_budget,
            "warmup": args.warmup,
            "inject": args.inject,
            "tp_size": world,
        },
    }
    print(f"engine ready: {result['geometry']} on {result['device']}, server context {context}", file=sys.stderr)

    server = Server(engine, args, context, name)
    server.start()
    spec = {
        "base_url": server.url,
        "model": name,
        "words": words,
        "vocab": vocab,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "clients": args.clients,
        "seconds": args.seconds,
        "drain_cap": args.drain_cap,
        "warmup": args.warmup,
    }
    try:
        server.sample()
        load = run_clients(spec)
        solo = solo_pass(spec, load["records"], args.solo)
    finally:
        server_counts = server.stop()
    samples = server.samples
    server = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"server stopped: {len(load['records'])} requests; sequential generate now", file=sys.stderr)

    records = sorted(load["records"], key=lambda r: (r["client"], r["index"]))
    lost = [r for r in records if r.get("error") or r.get("finish_reason") not in ("stop", "length")]
    lost_ids = {id(r) for r in lost}
    done = [r for r in records if id(r) not in lost_ids]
    warm_lost = [r for r in load["warmup"] if r.get("error") or not r.get("finish_reason")]

    starts = [r["started"] for r in records]
    ends = [r["ended"] for r in done]
    window = max(ends) - min(starts) if done else 0.0
    out_tokens = sum(r.get("usage", {}).get("completion", len(r["chunks"])) for r in done)
    ttft = [r["chunks"][0] - r["started"] for r in done if r["chunks"]]
    tbt = [b - a for r in done for a, b in zip(r["chunks"], r["chunks"][1:])]
    served = {
        "path": "server",
        "requests": len(done),
        "output_tokens": out_tokens,
        "seconds": round(window, 2),
        "tokens_per_s": round(out_tokens / window, 2) if window else 0.0,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "tbt_p50_ms": ms(percentile(tbt, 50)),
        "tbt_p99_ms": ms(percentile(tbt, 99)),
        "lost": len(lost),
        "mismatched": None,
        "prompt_tokens_mean": round(sum(r.get("usage", {}).get("prompt", 0) for r in done) / max(1, len(done)), 1),
        "drain_s": round(max(ends) - load["stop_at"], 2) if done else None,
        "batch_mean": round(sum(s["batch"] for s in samples) / len(samples), 2) if samples else None,
        "running_mean": round(sum(s["running"] for s in samples) / len(samples), 2) if samples else None,
        "queued_max": max((s["queued"] for s in samples), default=None),
        **server_counts,
        "warmup_s": [round(r["ended"] - r["started"], 2) for r in load["warmup"]],
    }
    lost_rows = [{k: r.get(k) for k in ("client", "index", "finish_reason", "error")} for r in lost[:DETAILS]]
    result.update(server=served, lost=lost_rows, warmup_lost=len(warm_lost), baseline=None)
    write(args.out, result)  # the load's figures, kept if the baseline does not finish

    # the baseline: the same prompts through sequential Engine.generate, after the server stopped
    warm_prompt = prompt_text(words, vocab, args.prompt_tokens, args.seed, *share_prompt((WARMUP_CLIENT, 0), device))
    reference(engine, tokenizer, warm_prompt, args.max_tokens, device)  # kernels compiled, the step captured
    mismatched, base_seconds, base_tokens, timings = [], 0.0, 0, []
    checked, cap_at = 0, time.perf_counter() + (args.baseline_cap or float("inf"))
    for record in sorted(done, key=lambda r: r["started"]):  # a capped pass still covers every client
        if time.perf_counter() > cap_at:
            break
        share_prompt((record["client"], record["index"]), device)
        text = prompt_text(words, vocab, args.prompt_tokens, args.seed, record["client"], record["index"])
        expected, seconds, timing = reference(engine, tokenizer, text, args.max_tokens, device)
        checked += 1
        base_seconds += seconds
        base_tokens += timing["tokens"]
        timings.append(timing)
        if record["text"] != expected:
            at = first_difference(record["text"], expected)
            mismatched.append(
                {
                    "client": record["client"],
                    "index": record["index"],
                    "first_difference_at_char": at,
                    "first_difference_at_word": expected[:at].count(" "),  # the token, for the word tokenizer
                    "server": record["text"][max(0, at - 20) : at + 40],
                    "generate": expected[max(0, at - 20) : at + 40],
                }
            )
    share_prompt(None, device)  # the other ranks' pass ends with rank 0's
    served["mismatched"] = len(mismatched)
    served["checked"] = checked
    served["unchecked"] = len(done) - checked
    solo_differ = [r for r in solo if r.get("error") or r["text"] != r["loaded_text"]]
    solo_ttft = [r["chunks"][0] - r["started"] for r in solo if r["chunks"]]
    solo_tbt = [b - a for r in solo for a, b in zip(r["chunks"], r["chunks"][1:])]
    solo_row = {
        "path": "server, one request at a time",
        "requests": len(solo),
        "ttft_p50_ms": ms(percentile(solo_ttft, 50)),
        "ttft_p99_ms": ms(percentile(solo_ttft, 99)),
        "tbt_p50_ms": ms(percentile(solo_tbt, 50)),
        "tbt_p99_ms": ms(percentile(solo_tbt, 99)),
        "lost": sum(1 for r in solo if r.get("error")),
        "mismatched": len(solo_differ),
        "differ": [
            {
                "client": r["client"],
                "index": r["index"],
                "error": r.get("error"),
                "first_difference_at_char": first_difference(r["text"], r["loaded_text"]),
            }
            for r in solo_differ[:DETAILS]
        ],
    }

    prefills = [t["prefill_s"] for t in timings if t["prefill_s"] is not None]
    steps = [t["step_ms"] for t in timings if t["step_ms"] is not None]
    baseline = {
        "path": "sequential Engine.generate",
        "requests": checked,
        "output_tokens": base_tokens,
        "seconds": round(base_seconds, 2),
        "tokens_per_s": round(base_tokens / base_seconds, 2) if base_seconds else 0.0,
        "request_s_mean": round(base_seconds / checked, 3) if checked else None,
        "prefill_s_mean": round(sum(prefills) / len(prefills), 3) if prefills else None,
        "step_ms_mean": round(sum(steps) / len(steps), 3) if steps else None,
    }
    if baseline["request_s_mean"] and baseline["prefill_s_mean"]:
        baseline["prefill_bound"] = round(baseline["request_s_mean"] / baseline["prefill_s_mean"], 3)
    served["vs_generate"] = round(served["tokens_per_s"] / baseline["tokens_per_s"], 3) if base_seconds else None
    result.update(
        baseline=baseline,
        solo=solo_row,
        ratio_tokens_per_s=served["vs_generate"],
        mismatched=mismatched[:DETAILS],
        load_average={"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]},
        ok=bool(checked) and not lost and not mismatched and not warm_lost and not solo_differ,
    )
    print(json.dumps(result, indent=1))
    write(args.out, result)
    columns = [
        ("path", "path", ""),
        ("requests", "requests", ""),
        ("output tokens", "output_tokens", ""),
        ("s", "seconds", ".1f"),
        ("tokens/s", "tokens_per_s", ".1f"),
        ("x generate", "vs_generate", ".2f"),
        ("TTFT p50 ms", "ttft_p50_ms", ".0f"),
        ("TTFT p99 ms", "ttft_p99_ms", ".0f"),
        ("TBT p50 ms", "tbt_p50_ms", ".1f"),
        ("TBT p99 ms", "tbt_p99_ms", ".1f"),
        ("lost", "lost", ""),
        ("mismatched", "mismatched", ""),
    ]
    print(format_table([served, baseline] + [solo_row] * bool(solo), columns), file=sys.stderr)
    for row in result["lost"]:
        why = row["error"] or row["finish_reason"]
        print(f"lost: client {row['client']} request {row['index']}: {why}", file=sys.stderr)
    for row in result["mismatched"]:
        print(
            f"mismatch: client {row['client']} request {row['index']} at char {row['first_difference_at_char']}: "
            f"server {row['server']!r} generate {row['generate']!r}",
            file=sys.stderr,
        )
    if served["unchecked"]:
        print(f"{served['unchecked']} complete responses not checked (--baseline-cap)", file=sys.stderr)
    if baseline.get("prefill_bound"):
        print(
            f"prefill-bound: generate spends {baseline['prefill_s_mean']:.3f} s of {baseline['request_s_mean']:.3f} s "
            f"a request in prefill, so no server reaches more than {baseline['prefill_bound']:.2f}x it on this mix",
            file=sys.stderr,
        )
    leave_process_group()  # with several ranks: every rank's pass has ended
    if not result["ok"]:
        print(
            f"FAILED: {len(lost)} lost, {len(mismatched)} mismatched of {checked} checked, "
            f"{len(warm_lost)} warm-up lost, {len(done)} complete, {len(solo_differ)} of {len(solo)} "
            "differ when sent alone",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
