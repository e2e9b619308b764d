"""Look policies up by registered name or by ``"package.module:ClassName"``."""

from __future__ import annotations

import importlib
from typing import Any

from omnikv_runtime.errors import ConfigError, did_you_mean
from omnikv_runtime.policies.base import SelectionPolicy
from omnikv_runtime.policies.eviction_base import EvictionPolicy

SELECTION_POLICIES: dict[str, type[SelectionPolicy]] = {}
EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {}
FIELD = "omnikv.selector.type"
EVICTION_FIELD = "offload.eviction.type"


def register_selection_policy(cls: type[SelectionPolicy]) -> type[SelectionPolicy]:
    """Register `cls` under ``cls.name`` (usable as a class decorator)."""
    SELECTION_POLICIES[cls.name] = cls
    return cls


def register_eviction_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Register an eviction policy under ``cls.name`` (usable as a class decorator)."""
    EVICTION_POLICIES[cls.name] = cls
    return cls


def resolve_policy_class(
    spec: str,
    registry: dict[str, type] | None = None,
    base: type = SelectionPolicy,
    field: str = FIELD,
) -> type:
    """The class for a registered name or a ``"module:Class"`` path; ConfigError naming `field` otherwise.

    Defaults look up selection policies; pass ``EVICTION_POLICIES, EvictionPolicy, EVICTION_FIELD``
    for eviction policies.
    """
    registry = SELECTION_POLICIES if registry is None else registry
    if ":" not in spec:
        if spec in registry:
            return registry[spec]
        names = sorted(registry)
        raise ConfigError(field, spec, f"one of {names}{did_you_mean(spec, names)} or 'package.module:Class'")
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name or ":" in class_name:
        raise ConfigError(field, spec, "'package.module:ClassName' with one ':' and both parts given")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(field, spec, f"an importable module before ':' ({exc})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(field, spec, f"a class that module '{module_name}' defines; it has no '{class_name}'")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(field, spec, f"a subclass of omnikv_runtime.policies.{base.__name__}")
    missing = missing_methods(cls)
    if missing:
        raise ConfigError(field, spec, f"a class that implements {missing} (it inherits the base's unimplemented one)")
    return cls


def missing_methods(cls: type) -> str:
    """What a policy class leaves unimplemented ('' if nothing): the interface check of the registry."""
    from omnikv_runtime.policies.lossy import LossyPolicy

    if issubclass(cls, LossyPolicy):
        return "" if cls.rank is not LossyPolicy.rank else "rank(ctx, state)"
    if issubclass(cls, SelectionPolicy):
        overrides = cls.scores is not SelectionPolicy.scores or cls.select is not SelectionPolicy.select
        return "" if overrides else "scores(ctx) or select(ctx)"
    if issubclass(cls, EvictionPolicy):
        return "" if cls.priority is not EvictionPolicy.priority else "priority(state)"
    return ""


def make_selection_policy(selector: dict[str, Any]) -> SelectionPolicy:
    """Build the policy a config's ``omnikv.selector`` section describes."""
    params = dict(selector)
    cls = resolve_policy_class(str(params.pop("type", "last")))
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError("omnikv.selector", selector, f"arguments {cls.__name__} accepts ({exc})") from None


def make_eviction_policy(eviction: dict[str, Any]) -> EvictionPolicy:
    """Build the eviction policy a config's ``offload.eviction`` section describes."""
    params = dict(eviction)
    cls = resolve_policy_class(str(params.pop("type", "lru")), EVICTION_POLICIES, EvictionPolicy, EVICTION_FIELD)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError("offload.eviction", eviction, f"arguments {cls.__name__} accepts ({exc})") from None
