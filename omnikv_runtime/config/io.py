"""Reading a config file, and turning pydantic's validation errors into :class:`ConfigError`.

Every way a file can fail to load (missing, unreadable, not UTF-8, not JSON, nested too deep,
an integer past Python's digit limit, not an object) is a ConfigError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from omnikv_runtime.errors import ConfigError, did_you_mean

FILE = "<file>"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in the file at `path`; ConfigError naming the file for anything else."""
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(FILE, where, f"a readable file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            FILE, where, f"UTF-8 text (byte {exc.start} is {raw[exc.start : exc.start + 1]!r}: {exc.reason})"
        ) from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(FILE, where, f"valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ConfigError(FILE, where, "JSON nested less deeply (it exceeds Python's recursion limit)") from None
    except ValueError as exc:  # the integer digit limit, or NaN/Infinity
        reason = "an integer past Python's 4300-digit limit" if "digits" in str(exc) else str(exc)
        raise ConfigError(FILE, where, f"valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(FILE, where, "a JSON object at the top level")
    return data


def _dotted(config_cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Turn a pydantic error location into a dotted field path, dropping union tags like 'int'."""
    parts: list[str] = []
    cls: type[BaseModel] | None = config_cls
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] = f"{parts[-1]}[{item}]"
            else:  # a top-level key that is not a string
                parts.append(f"[{item}]")
            continue
        if cls is None:
            continue  # a union member tag such as 'int' or 'float'
        if item in cls.model_fields:
            annotation = cls.model_fields[item].annotation
            parts.append(item)
            cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        else:  # an unknown key
            parts.append(str(item))
            cls = None
    return ".".join(parts)


def _section_fields(config_cls: type[BaseModel], path: list[str]) -> list[str]:
    cls: Any = config_cls
    for name in path:
        annotation = cls.model_fields[name].annotation if name in getattr(cls, "model_fields", {}) else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        cls = annotation
    return list(cls.model_fields)


def validation_error(exc: ValidationError, config_cls: type[BaseModel]) -> ConfigError:
    """The first pydantic error of `exc` as a ConfigError naming field, value and what is allowed."""
    error = exc.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):  # a rule across a section's fields, raised naming its own field
        return cause
    field = _dotted(config_cls, tuple(error["loc"]))
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        *section, key = field.split(".")
        known = _section_fields(config_cls, section)
        where = f"section '{'.'.join(section)}'" if section else "the top level"
        return ConfigError(field, value, f"unknown key in {where}{did_you_mean(key, known)}; known: {known}")
    message = error["msg"].removeprefix("Value error, ")
    return ConfigError(field, value, message)
