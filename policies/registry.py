"""Look policies up by registered name or by ``"package.module:ClassName"``."""

from __future__ import annotations

import importlib
from typing import Any

from omnikv_runtime.errors import ConfigError, did_you_mean
from omnikv_runtime.policies.base import SelectionPolicy

SELECTION_POLICIES: dict[str, type[SelectionPolicy]] = {}
FIELD = "omnikv.selector.type"


def register_selection_policy(cls: type[SelectionPolicy]) -> type[SelectionPolicy]:
    """Register `cls` under ``cls.name`` (usable as a class decorator)."""
    SELECTION_POLICIES[cls.name] = cls
    return cls


def resolve_policy_class(spec: str) -> type[SelectionPolicy]:
    """The policy class for a registered name or a ``"module:Class"`` path; ConfigError otherwise."""
    if ":" not in spec:
        if spec in SELECTION_POLICIES:
            return SELECTION_POLICIES[spec]
        names = sorted(SELECTION_POLICIES)
        raise ConfigError(FIELD, spec, f"one of {names}{did_you_mean(spec, names)} or 'package.module:Class'")
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(FIELD, spec, f"an importable module before ':' ({exc})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(FIELD, spec, f"a class that module '{module_name}' defines; it has no '{class_name}'")
    if not (isinstance(cls, type) and issubclass(cls, SelectionPolicy)):
        raise ConfigError(FIELD, spec, "a subclass of omnikv_runtime.policies.SelectionPolicy")
    return cls


def make_selection_policy(selector: dict[str, Any]) -> SelectionPolicy:
    """Build the policy a config's ``omnikv.selector`` section describes."""
    params = dict(selector)
    cls = resolve_policy_class(str(params.pop("type", "last")))
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError("omnikv.selector", selector, f"arguments {cls.__name__} accepts ({exc})") from None
