"""Rows of dicts as a text table: what the benchmarks print on stderr beside their JSON on stdout.

A column is ``(header, value, spec)``: ``value`` is a key of the row or a function of the row, ``spec``
a format spec for numbers (``".2f"``; ``""`` prints them as they are). A missing value prints empty.
Aligned columns by default (text left, numbers right); ``markdown=True`` gives a Markdown table to
paste into the docs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Column = tuple[str, str | Callable[[dict[str, Any]], Any], str]


def _cell(row: dict[str, Any], value: str | Callable[[dict[str, Any]], Any], spec: str) -> tuple[str, bool]:
    """The text of one cell, and whether it is a number (right-aligned)."""
    found = value(row) if callable(value) else row.get(value)
    if found is None:
        return "", False
    number = isinstance(found, (int, float)) and not isinstance(found, bool)
    return (format(found, spec) if number else str(found)), number


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], markdown: bool = False) -> str:
    """The table of `rows` with `columns` (see the module docstring)."""
    headers = [header for header, _, _ in columns]
    cells = [[_cell(row, value, spec) for _, value, spec in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(text for text, _ in line) + " |" for line in cells]
        return "\n".join(lines)
    widths = [max([len(header)] + [len(line[i][0]) for line in cells]) for i, header in enumerate(headers)]
    numeric = [any(line[i][1] for line in cells) for i in range(len(headers))]
    lines = ["  ".join(h.rjust(w) if n else h.ljust(w) for h, w, n in zip(headers, widths, numeric)).rstrip()]
    for line in cells:
        texts = [text.rjust(w) if number else text.ljust(w) for (text, number), w in zip(line, widths)]
        lines.append("  ".join(texts).rstrip())
    return "\n".join(lines)
