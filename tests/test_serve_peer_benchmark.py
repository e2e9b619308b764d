"""benchmarks/serve_peer.py on CPU: its seeded trace, its word tokenizer, how it counts what a server did not
serve, and the smallest whole run: ``omnikv serve`` and ``transformers serve`` (where it can run here) as
processes of their own, on a tiny random Llama, through the openai client."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import serve_peer  # noqa: E402
import server_processes  # noqa: E402

TRACE = dict(rate=2.0, prompt_tokens=(64, 128), new_tokens=(4, 8), shared_fraction=0.5, document_tokens=128)
SMALLEST = ["--model", "tiny", "--device", "cpu", "--requests", "3", "--rate", "20", "--prompt-tokens", "64..128"]
SMALLEST += ["--new-tokens", "4..8", "--start-timeout", "300", "--request-timeout", "120", "--drain-cap", "120"]


def test_trace_is_seeded_and_as_asked():
    trace = serve_peer.make_trace(3, 200, vocab=1000, **TRACE)
    assert trace == serve_peer.make_trace(3, 200, vocab=1000, **TRACE)
    assert trace != serve_peer.make_trace(4, 200, vocab=1000, **TRACE)
    assert trace[0]["arrival_s"] == 0 and all(a["arrival_s"] < b["arrival_s"] for a, b in zip(trace, trace[1:]))
    gaps = [b["arrival_s"] - a["arrival_s"] for a, b in zip(trace, trace[1:])]
    assert 0.35 < sum(gaps) / len(gaps) < 0.65  # Poisson arrivals of 2 a second: 0.5 s apart on average
    assert all(64 <= len(e["prompt_ids"]) <= 128 and 4 <= e["new_tokens"] <= 8 for e in trace)
    assert all(0 < i < 1000 for e in trace for i in e["prompt_ids"])
    sharing = [e for e in trace if e["shared_tokens"]]
    assert 70 < len(sharing) < 130  # half, drawn
    document = max(sharing, key=lambda e: e["shared_tokens"])["prompt_ids"]
    for entry in sharing:  # the document's first tokens, then a question of its own (a sixteenth)
        shared = entry["shared_tokens"]
        assert entry["prompt_ids"][:shared] == document[:shared]
        assert shared == len(entry["prompt_ids"]) - max(1, len(entry["prompt_ids"]) // 16)
    alone = [e for e in trace if not e["shared_tokens"]]
    assert len({tuple(e["prompt_ids"][:8]) for e in alone}) == len(alone)


def test_word_tokenizer_is_one_token_a_word_both_ways():
    tokenizer = serve_peer.word_tokenizer(300)
    ids = [17, 9, 255, 1]
    text = serve_peer.prompt_text(ids)
    assert tokenizer(text, add_special_tokens=True)["input_ids"] == ids
    assert tokenizer.decode(ids) == text == "w17 w9 w255 w1"
    assert max(len(entry) for entry in tokenizer.get_vocab()) >= len(" w255")  # a token holds its space


@pytest.mark.parametrize("text, bounds", [("8192..32768", (8192, 32768)), ("128", (128, 128))])
def test_token_ranges(text, bounds):
    assert serve_peer.token_range(text) == bounds


@pytest.mark.parametrize("text", ["0..5", "9..3", "a..b", ""])
def test_bad_token_ranges_say_what_is_allowed(text):
    with pytest.raises(argparse.ArgumentTypeError, match="LOW"):
        serve_peer.token_range(text)


def record(index, tokens, chunks, **extra):
    base = {"index": index, "expected_tokens": tokens, "started": 10.0, "ended": 10.0 + chunks[-1] if chunks else 11}
    text = " ".join(f"w{i}" for i in range(tokens))
    return {**base, "chunks": [10.0 + c for c in chunks], "text": text, "finish_reason": "length", **extra}


def test_unserved_requests_are_counted_with_their_reason():
    records = [
        record(0, 3, [0.5, 0.6, 0.7]),
        record(1, 2, [0.2, 1.0]),
        record(2, 2, [0.3], error="APIError: out of memory"),
        record(3, 2, [], timeout="not done 5 s after the last arrival"),
        record(4, 2, [0.4, 0.5], finish_reason=None),
    ]
    row = serve_peer.summarize("peer", records, {"peak_memory_mib": 7}, None)
    assert (row["requests"], row["completed"], row["errors"], row["timeouts"]) == (5, 2, 2, 1)
    assert row["generated_tokens"] == 5 and row["seconds"] == 1.0 and row["tokens_per_s"] == 5.0
    assert row["ttft_p50_ms"] == 350.0 and row["tbt_p50_ms"] == 100.0 and row["peak_memory_mib"] == 7
    assert [u["index"] for u in row["unserved"]] == [2, 3, 4]
    assert "out of memory" in row["unserved"][0]["why"] and row["unserved"][1]["why"].startswith("timeout")
    down = serve_peer.summarize("peer", records, {}, "error: exited with status 1 before answering")
    assert (down["completed"], down["errors"], down["tokens_per_s"]) == (0, 5, 0.0)


def test_same_text_is_compared_on_what_every_server_completed():
    rows = [{"texts": {0: ("w1",), 1: ("w2",), 2: ("w3",)}}, {"texts": {0: ("w1",), 1: ("w9",)}}]
    assert serve_peer.agreement(rows) == {"compared": 2, "equal": 1} and "texts" not in rows[0]
    # the digests compare halves run in separate calls: equal words, equal digests; other words, other digests
    first, second = rows[0]["text_digests"], rows[1]["text_digests"]
    assert set(first) == {0, 1, 2} and set(second) == {0, 1}
    assert first[0] == second[0] and first[1] != second[1] and len(first[2]) == 16


def test_peer_command_on_cpu_sizes_its_cache_to_the_trace(tmp_path):
    args = serve_peer.parse(SMALLEST + ["--peer-arg=--log-level=warning"])
    trace = serve_peer.make_trace(0, 3, vocab=1000, **TRACE)
    server = server_processes.transformers_server("/m", args, 136, "float32", trace, str(tmp_path))
    command = server.command
    assert command[command.index("serve") + 1 : command.index("serve") + 3] == ["/m", "--continuous-batching"]
    assert command[command.index("--attn-implementation") + 1] == "sdpa"
    blocks = sum(-(-(len(e["prompt_ids"]) + e["new_tokens"]) // 32) + 1 for e in trace) + 8
    assert command[command.index("--cb-num-blocks") + 1] == str(blocks) and command[-1] == "--log-level=warning"


def test_omnikv_command_carries_the_prefix_cache_and_the_turn_budget(tmp_path):
    trace = serve_peer.make_trace(0, 3, vocab=1000, **TRACE)
    args = serve_peer.parse(SMALLEST)
    command = server_processes.omnikv_server("/m", args, 136, "float32", trace, str(tmp_path)).command
    assert command[command.index("--prefix-cache-bytes") + 1] == "0" and "--max-prefill-tokens" not in command
    args = serve_peer.parse([*SMALLEST[:3], "cuda", *SMALLEST[4:], "--max-prefill-tokens", "8192"])
    command = server_processes.omnikv_server("/m", args, 136, "bfloat16", trace, str(tmp_path)).command
    assert command[command.index("--prefix-cache-bytes") + 1] == str(8 * 10**9)
    assert command[command.index("--max-prefill-tokens") + 1] == "8192"


def test_smallest_run_on_cpu(tmp_path, capsys):
    """Both servers, one after the other, the same trace; ``transformers serve`` only where it can run here."""
    missing = [name for name in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the servers need {', '.join(missing)}")
    peer = server_processes.peer_available() is None
    servers = "omnikv,transformers" if peer else "omnikv"
    out = tmp_path / "peer.json"
    assert serve_peer.main(SMALLEST + ["--servers", servers, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["server"]: row for row in report["servers"]}
    expected = report["trace"]["new_tokens"]
    for row in rows.values():
        assert row["completed"] == 3 and row["errors"] == row["timeouts"] == row["short"] == 0
        assert row["generated_tokens"] == expected and row["tokens_per_s"] > 0
        assert row["ttft_p99_ms"] >= row["ttft_p50_ms"] > 0 and row["tbt_p50_ms"] > 0 and row["peak_memory_mib"] > 0
    assert report["trace"]["prompt_tokens"]["max"] <= 128 and report["settings"]["context"] == 136
    (capacity,) = rows["omnikv"]["said"]  # the server's start line: slots of the context it can hold, auto's
    assert "concurrent requests of 136 tokens" in capacity and capacity.endswith("serving 64")
    table = capsys.readouterr().err
    assert "| omnikv | 3 | 0 | 0 |" in table
    if not peer:
        pytest.skip("omnikv half run; transformers serve cannot run here: " + server_processes.peer_available())
    assert report["ratios"]["tokens_per_s"] == pytest.approx(
        rows["omnikv"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"], rel=1e-2
    )
    assert report["same_text"]["compared"] == 3  # float32 on the CPU: the same greedy words, or close


def test_a_kept_model_folder_is_used_again(tmp_path, monkeypatch):
    folder = str(tmp_path / "model")
    first = serve_peer.save_model(folder, "tiny", "cpu", 256)
    assert first["dtype"] == "float32" and (tmp_path / "model" / "tokenizer.json").is_file()

    def built_again(*args):
        raise RuntimeError("built again")

    monkeypatch.setattr(serve_peer, "random_model", built_again)
    assert serve_peer.save_model(folder, "tiny", "cpu", 256) == first
    with pytest.raises(RuntimeError, match="built again"):  # another context: another model
        serve_peer.save_model(folder, "tiny", "cpu", 512)
