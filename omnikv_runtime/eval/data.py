"""Reading benchmark JSONL files with errors that name the file, the line and the field."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnikv_runtime.errors import OmniKVError

logger = logging.getLogger(__name__)


class EvalDataError(OmniKVError, ValueError):
    """A benchmark file is missing or holds a line that is not a valid sample."""


@dataclass
class Sample:
    """One benchmark question: ``fields`` are the file's own keys (after any task-specific fix-up)."""

    task: str
    id: str
    fields: dict[str, Any]
    answers: list[Any]
    extra: dict[str, Any] = field(default_factory=dict)  # scorer inputs such as all_classes


def read_jsonl(path: Path, required: Iterable[str], limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-empty line of ``path``; checks ``required`` keys.

    Raises EvalDataError for a missing file, a line that is not a JSON object, a missing field, or a
    file without samples.
    ``limit`` stops after that many samples (later lines are not read).
    """
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found (expected one JSONL file per task in the data directory)")
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = f"{path}, line {number}"
                raise EvalDataError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(
                    f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}, line {number}: expected a JSON object, got {type(obj).__name__}")
            missing = [key for key in required if key not in obj]
            if missing:
                raise EvalDataError(
                    f"{path}, line {number}: missing field {missing[0]!r} (this task needs {sorted(required)})"
                )
            rows.append((number, obj))
    if not rows and limit != 0:
        raise EvalDataError(f"{path}: no samples (the file is empty or holds only blank lines)")
    return rows


def field_error(path: Path, line: int, name: str, value: Any, allowed: str) -> EvalDataError:
    """An EvalDataError for a field whose value is not allowed."""
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
    return EvalDataError(f"{path}, line {line}: field {name!r} = {shown} is not allowed: {allowed}")


def text_field(path: Path, line: int, obj: dict[str, Any], name: str) -> str:
    """``obj[name]``, which must be a string (a number or null there is a broken row, not text to quote)."""
    value = obj[name]
    if not isinstance(value, str):
        raise field_error(path, line, name, value, "a string")
    return value


def sample_id(path: Path, line: int, obj: dict[str, Any], name: str, seen: dict[str, int]) -> str:
    """The row's id from field ``name`` (``line<N>`` without one), refused when an earlier line of the file
    (``seen``: id -> line, updated here) has it too: predictions are stored and resumed by id."""
    value = obj.get(name)
    if value is None:
        return f"line{line}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise field_error(path, line, name, value, "a string or a whole number")
    text = str(value)
    if text in seen:
        raise field_error(path, line, name, value, f"ids must be unique, and line {seen[text]} has this one")
    seen[text] = line
    return text
