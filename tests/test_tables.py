"""The benchmarks' text tables (omnikv_runtime.tables)."""

from __future__ import annotations

from omnikv_runtime.tables import format_table

ROWS = [{"name": "last", "found": 15, "ms": 1.234, "exact": True}, {"name": "h2o", "found": 9, "ms": None}]
COLUMNS = [("policy", "name", ""), ("found", "found", ""), ("ms", "ms", ".1f"), ("ok", "exact", "")]


def test_aligned_columns():
    assert format_table(ROWS, COLUMNS).splitlines() == [
        "policy  found   ms  ok",
        "last       15  1.2  True",
        "h2o         9",
    ]


def test_markdown_and_computed_columns():
    columns = [("policy", "name", ""), ("found x2", lambda row: 2 * row["found"], "")]
    assert format_table(ROWS, columns, markdown=True).splitlines() == [
        "| policy | found x2 |",
        "|---|---|",
        "| last | 30 |",
        "| h2o | 18 |",
    ]
