"""The benchmark of how many long requests the server runs at once: small, on the CPU, it runs every slot
together, checks responses against a solo ``generate``, and fails when one differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
