"""The benchmark of how many long requests the server runs at once: small, on the CPU, it runs every slot
together, checks responses against a solo ``generate``, and fails when one differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import omnikv_runtime as okv

BENCHMARK = ["--model", "tiny", "--context", "96", "--new-tokens", "3", "--slots", "3", "--solo", "2"]


def test_the_benchmark_runs_every_slot_together_and_notices_a_different_response(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import serve_concurrent

    assert serve_concurrent.main([*BENCHMARK, "--out", str(tmp_path / "concurrent.json")]) == 0
    report = json.loads((tmp_path / "concurrent.json").read_text())
    assert report["slots"] == report["served_at_once"] == 3 and report["solo_equal"] == [True, True]
    assert report["solo_first_difference"] == [None, None]
    assert report["failed"] == [] and report["peer"] is None and report["planner_slots"] >= 3
    assert "omnikv serve" in capsys.readouterr().err
    generate = okv.Engine.generate

    def shifted(self, *args, **kwargs):  # a solo run that answers otherwise: the benchmark must say so
        out = generate(self, *args, **kwargs)
        out[0, -1] = (out[0, -1] + 1) % self.model.config.vocab_size
        return out

    monkeypatch.setattr(okv.Engine, "generate", shifted)
    assert serve_concurrent.main(BENCHMARK) == 1
    shifted_report = json.loads(capsys.readouterr().out)
    assert shifted_report["solo_equal"] == [False, False]
    assert shifted_report["solo_first_difference"] == [2, 2]  # the last of the 3 new tokens


def test_responses_of_an_earlier_run_are_checked_in_a_later_one(tmp_path, capsys, monkeypatch):
    """--responses checks an earlier run's kept responses against solo runs without serving again, from
    --solo-from on; it refuses a file whose settings are not this run's, and still notices a different response."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import serve_concurrent

    first = tmp_path / "first.json"
    assert serve_concurrent.main([*BENCHMARK[:-1], "1", "--out", str(first)]) == 0
    assert json.loads(first.read_text())["solo_checked"] == [0]
    served = []
    monkeypatch.setattr(serve_concurrent, "serve_at_once", lambda *args: served.append(args))
    later = [*BENCHMARK, "--solo-from", "1", "--responses", str(first), "--out", str(tmp_path / "later.json")]
    assert serve_concurrent.main(later) == 0 and served == []
    report = json.loads((tmp_path / "later.json").read_text())
    assert report["solo_checked"] == [1, 2] and report["solo_equal"] == [True, True]
    assert report["responses"] == json.loads(first.read_text())["responses"]
    capsys.readouterr()
    tampered = json.loads(first.read_text())
    tampered["responses"][2][0] = (tampered["responses"][2][0] + 1) % 100
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    assert serve_concurrent.main([*BENCHMARK, "--solo-from", "1", "--responses", str(tmp_path / "tampered.json")]) == 1
    assert json.loads(capsys.readouterr().out)["solo_first_difference"] == [None, 0]
    with pytest.raises(SystemExit, match="its context is 96, this run's 128"):
        serve_concurrent.main(["--model", "tiny", "--context", "128", "--new-tokens", "3", "--responses", str(first)])
