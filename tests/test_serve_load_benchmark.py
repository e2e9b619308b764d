"""benchmarks/serve_load.py in its smallest form on CPU: a tiny random Llama behind the real server, two
openai clients for a second, every response checked against sequential ``Engine.generate``; and the
check failing when the server's text is corrupted on purpose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))  # the clients' process imports it by name
import serve_load  # noqa: E402

SMALLEST = ["--model", "random-llama3-8b", "--tiny", "--clients", "2", "--seconds", "1", "--prompt-tokens", "24"]
SMALLEST += ["--max-tokens", "4", "--max-batch", "2", "--solo", "1", "--threads", "1"]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_load_is_checked_against_generate(tmp_path, capsys, threads):
    out = tmp_path / "serve.json"
    assert serve_load.main(SMALLEST + ["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    server, baseline = report["server"], report["baseline"]
    assert report["ok"] and server["lost"] == 0 and server["mismatched"] == 0 and server["unchecked"] == 0
    assert server["requests"] >= 2 and server["requests"] == server["checked"] == baseline["requests"]
    assert server["output_tokens"] == baseline["output_tokens"] == 4 * server["requests"]  # random weights: no EOS
    assert server["prompt_tokens_mean"] == 24 and server["ttft_p50_ms"] > 0 and server["tbt_p50_ms"] > 0
    assert report["solo"]["requests"] == 1 and report["solo"]["mismatched"] == 0
    assert server["vs_generate"] == pytest.approx(server["tokens_per_s"] / baseline["tokens_per_s"], rel=1e-2)
    assert 0 < baseline["prefill_s_mean"] < baseline["request_s_mean"]
    assert baseline["prefill_bound"] == pytest.approx(baseline["request_s_mean"] / baseline["prefill_s_mean"], 1e-2)
    err = capsys.readouterr().err
    assert "x generate" in err and f"no server reaches more than {baseline['prefill_bound']:.2f}x" in err


def test_corrupted_text_fails_the_run(tmp_path, capsys, threads):
    out = tmp_path / "serve.json"
    assert serve_load.main(SMALLEST + ["--inject", "corrupt", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert not report["ok"] and report["server"]["lost"] == 0
    corrupted = report["mismatched"]
    assert corrupted and all(row["server"] != row["generate"] for row in corrupted)
    assert all(row["server"].lower() == row["generate"].lower() for row in corrupted)  # what was changed
    assert "FAILED" in capsys.readouterr().err


def test_word_tokenizer_round_trip():
    tokenizer = serve_load.WordTokenizer(1000)
    text = serve_load.prompt_text(None, 1000, 16, 0, 3, 7)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 16 and tokenizer.decode(ids) == text and 0 not in ids
    assert text != serve_load.prompt_text(None, 1000, 16, 0, 3, 8)  # distinct per request
    with pytest.raises(ValueError):
        tokenizer("w1000")


@pytest.mark.slow
def test_load_on_two_ranks_is_checked_against_generate_on_the_same_ranks(tmp_path):
    """Under torchrun (about 20 s on a 2-core box): rank 0 serves and runs the clients, rank 1's scheduler
    follows its turns, and both run the sequential pass on the prompts rank 0 names."""
    import os
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    out = tmp_path / "serve.json"
    script = Path(__file__).parent.parent / "benchmarks" / "serve_load.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    done = subprocess.run(
        [*torchrun, str(script), *SMALLEST, "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    server = report["server"]
    assert report["ok"] and report["settings"]["tp_size"] == 2
    assert server["requests"] >= 2 and server["requests"] == server["checked"] and server["mismatched"] == 0
