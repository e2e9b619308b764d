"""The run directory's files, read and written so that a kill at any moment loses nothing.

* ``raw/<task>.rank<r>.jsonl``: one prediction record per line, appended and flushed per sample. A
  kill in the middle of a write leaves a torn last line; :func:`repair_tail` cuts it off before the
  next append (the sample it held is predicted again), so the next record starts on a line of its own.
* A record that cannot be used (not JSON, no string ``id``, a ``score`` that is not a number, a
  ``length`` that is not a whole number) is skipped with a warning naming the file, the line and the
  field: its sample counts as not done and is predicted again.
* ``run.json`` and ``results.json`` are written whole (a temporary file renamed over the old one);
  a ``run.json`` that does not parse is an error that says what to do, not a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from omnikv_runtime.eval.data import EvalDataError

logger = logging.getLogger(__name__)


def raw_files(out: Path, task: str) -> list[Path]:
    """The raw prediction files of ``task`` (every rank that ever wrote one), in rank order."""
    return sorted((out / "raw").glob(f"{task}.rank*.jsonl"))


def repair_tail(path: Path) -> bool:
    """Cut a torn last line (no closing newline: a write cut short) off ``path``; True if it had one."""
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1
    with path.open("rb+") as handle:
        handle.truncate(keep)
    logger.warning(
        "%s: cut off a torn last line (%d bytes, a write interrupted); it will be redone", path, len(data) - keep
    )
    return True


def _record_problem(record: Any) -> tuple[str, str] | None:
    """``(field, what is wrong)`` for a record the collector cannot use, else None."""
    if not isinstance(record, dict):
        return "<record>", f"expected a JSON object, got {type(record).__name__}"
    if not isinstance(record.get("id"), str):
        return "id", "missing" if "id" not in record else f"expected a string, got {record['id']!r}"
    if "error" not in record:
        score = record.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return "score", f"expected a number, got {score!r}"
    length = record.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
        return "length", f"expected a whole number of words or null, got {length!r}"
    return None


def read_raw(out: Path, task: str) -> dict[str, dict[str, Any]]:
    """Sample id -> its record, from every raw file of ``task``; unusable lines are skipped, named."""
    done: dict[str, dict[str, Any]] = {}
    for path in raw_files(out, task):
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s, line %d: not a whole record (an interrupted write); redone", path, number)
                    continue
                problem = _record_problem(record)
                if problem is not None:
                    logger.warning("%s, line %d: field %r %s; the sample is redone", path, number, *problem)
                    continue
                done[record["id"]] = record
    return done


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` whole: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as sink:
            sink.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_run_record(path: Path) -> dict[str, Any] | None:
    """The run directory's ``run.json`` (None if there is none); EvalDataError if it does not parse."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalDataError(
            f"{path} is damaged ({exc}), so this run's config cannot be checked: delete {path.name} to resume "
            "with the current config (predictions in raw/ of another config would then be reused), or give "
            "another --out"
        ) from None
    if not isinstance(data, dict):
        raise EvalDataError(
            f"{path}: expected a JSON object, got {type(data).__name__}; delete it or give another --out"
        )
    return data
