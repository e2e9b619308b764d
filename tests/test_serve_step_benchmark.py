"""The server-step benchmark, small, on the CPU: every figure it reports is there, and a request alone in the
batch's slots is timed against the engine's batch-1 step."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def test_the_benchmark_reports_the_full_batch_and_a_lone_request(capsys):
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import serve_step

    assert serve_step.main(["--tiny", "--context", "200", "--batches", "1,3", "--tiers", "cpu", "--steps", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["tier"], r["batch"]) for r in rows] == [("cpu", 1), ("cpu", 3)]
    for row in rows:
        assert row["engine_ms"] > 0 and row["slots_ms"] > 0 and row["lone_ms"] > 0
        assert row["lone_over_engine_1"] == row["lone_ms"] / rows[0]["engine_ms"]
        assert row["recordings_on_rejoin"] == 0
