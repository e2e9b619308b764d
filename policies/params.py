"""A policy's parameters: the dataclass fields it declares, their types and bounds, checked before use.

Every policy is a dataclass whose init fields are its parameters (as kvpress's presses are), so a
config can give exactly those and nothing else: an argument a policy does not declare is a
:class:`~omnikv_runtime.errors.ConfigError`, never silently ignored. :func:`bounded` declares a
numeric field with the lowest and highest value a config may give; types come from the field
annotations (``int``, ``float``, ``bool``, ``str``; others are left to the policy).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any

from omnikv_runtime.errors import ConfigError, did_you_mean

_BOUNDS = "omnikv_bounds"


def bounded(default: int | float, low: int | float, high: int | float) -> Any:
    """A dataclass field with `default` that a config may set from `low` to `high` (inclusive)."""
    return dataclasses.field(default=default, metadata={_BOUNDS: (low, high)})


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    """What ``cls(...)`` takes, by name; TypeError if it would take arguments it does not declare."""
    signature = inspect.signature(cls)
    variadic = [p.name for p in signature.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variadic:
        raise TypeError(
            f"{cls.__name__} takes *{variadic[0]}: a policy declares each parameter it uses (as a dataclass "
            "field), so that an argument it would ignore is refused"
        )
    return dict(signature.parameters)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else typing.get_type_hints(cls.__init__)
    except Exception:  # annotations of a user class that do not resolve: no type checks
        return {}


def _bounds(cls: type) -> dict[str, tuple[float, float]]:
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.metadata[_BOUNDS] for f in dataclasses.fields(cls) if _BOUNDS in f.metadata}


def check_value(field: str, value: Any, hint: Any, bounds: tuple[float, float] | None) -> None:
    """ConfigError naming `field` when `value` does not have type `hint` or lies outside `bounds`."""
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(field, value, "true or false")
    if hint is str and not isinstance(value, str):
        raise ConfigError(field, value, "a string")
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(field, value, "an integer" if hint is int else "a number")
    if hint is int and not isinstance(value, int):
        raise ConfigError(field, value, "an integer (a whole number, written without a decimal point)")
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(field, value, "a finite number")
    if bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = bounds
        if not low <= value <= high:
            raise ConfigError(field, value, f"a value from {low} to {high}")


def check_arguments(cls: type, params: dict[str, Any], section: str) -> None:
    """ConfigError naming ``section.<argument>`` for an argument `cls` does not take, or one of the
    wrong type or outside its bounds."""
    accepted = parameters(cls)
    hints, bounds = _hints(cls), _bounds(cls)
    for name, value in params.items():
        field = f"{section}.{name}"
        if name not in accepted:
            names = sorted(accepted)
            label = getattr(cls, "name", cls.__name__)
            takes = f"only {names}" if names else "no parameters"
            hint = did_you_mean(name, names)
            raise ConfigError(field, value, f"no such argument: {label!r} takes {takes} and would not use it{hint}")
        check_value(field, value, hints.get(name), bounds.get(name))


def check_fields(policy: Any) -> None:
    """Check a built policy's own parameter values (called from ``__post_init__``)."""
    cls = type(policy)
    values = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.init}
    hints, bounds = _hints(cls), _bounds(cls)
    for name, value in values.items():
        check_value(f"{cls.__name__}.{name}", value, hints.get(name), bounds.get(name))


def defaults(cls: type) -> dict[str, Any]:
    """Each parameter of `cls` with its default (parameters without one are left out)."""
    return {name: p.default for name, p in parameters(cls).items() if p.default is not inspect.Parameter.empty}
