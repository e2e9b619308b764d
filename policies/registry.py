"""Look policies up by registered name or by ``"package.module:ClassName"``, and check their arguments.

A ``"module:Class"`` path imports that module, which runs its code: that happens only when the
caller opts in (``trust_remote_code=True``, as transformers does for code shipped with a model).
A class imported with the opt-in stays usable by its path for the rest of the process, as if
registered; no other module is imported without it.
"""

from __future__ import annotations

import importlib
import math
import typing
from typing import Any

from omnikv_runtime.errors import ConfigError, did_you_mean
from omnikv_runtime.policies.base import SelectionPolicy
from omnikv_runtime.policies.eviction_base import EvictionPolicy

SELECTION_POLICIES: dict[str, type[SelectionPolicy]] = {}
EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {}
FIELD = "omnikv.selector.type"
EVICTION_FIELD = "offload.eviction.type"
# the original OmniKV's selector names that this runtime calls otherwise
SELECTION_ALIASES: dict[str, str] = {"softmax_before_last": "softmax_last"}
OPT_IN = (
    "a registered name; code named by 'module:Class' is imported only when you opt in: "
    "load_config(..., trust_remote_code=True), initialize(..., trust_remote_code=True), or --trust-remote-code "
    "on the command line (it runs that module's code), or register the class and use its name"
)
_TRUSTED: dict[tuple[type, str], type] = {}  # (base class, "module:Class") -> class imported with the opt-in


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
    trust_remote_code: bool = False,
) -> type:
    """The class for a registered name or a ``"module:Class"`` path; ConfigError naming `field` otherwise.

    Defaults look up selection policies; pass ``EVICTION_POLICIES, EvictionPolicy, EVICTION_FIELD``
    for eviction policies. A path is imported only with ``trust_remote_code=True`` (or if an
    earlier call imported it with the opt-in).
    """
    registry = SELECTION_POLICIES if registry is None else registry
    if ":" not in spec:
        if spec in registry:
            return registry[spec]
        if registry is SELECTION_POLICIES and spec in SELECTION_ALIASES:
            return registry[SELECTION_ALIASES[spec]]
        names = sorted(registry)
        raise ConfigError(field, spec, f"one of {names}{did_you_mean(spec, names)} or 'package.module:Class'")
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name or ":" in class_name:
        raise ConfigError(field, spec, "'package.module:ClassName' with one ':' and both parts given")
    if (base, spec) in _TRUSTED:
        return _TRUSTED[(base, spec)]
    if not trust_remote_code:
        raise ConfigError(field, spec, OPT_IN)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(field, spec, f"an importable module before ':' ({exc})") from None
    except Exception as exc:  # the module's own code failed: report it as the config's problem
        raise ConfigError(field, spec, f"a module that imports cleanly ({type(exc).__name__}: {exc})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(field, spec, f"a class that module '{module_name}' defines; it has no '{class_name}'")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(field, spec, f"a subclass of omnikv_runtime.policies.{base.__name__}")
    missing = missing_methods(cls)
    if missing:
        raise ConfigError(field, spec, f"a class that implements {missing} (it inherits the base's unimplemented one)")
    _TRUSTED[(base, spec)] = cls
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


def check_arguments(cls: type, params: dict[str, Any], section: str) -> None:
    """ConfigError naming ``section.<argument>`` for an argument of the wrong type or outside the class's
    ``limits`` (``{name: (low, high)}``); types come from the constructor's annotations (int, float,
    bool, str; others are left to the constructor)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # a user class with annotations that do not resolve: no type checks
        hints = {}
    limits: dict[str, tuple[float, float]] = getattr(cls, "limits", {})
    for name, value in params.items():
        field = f"{section}.{name}"
        hint = hints.get(name)
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
        if name in limits and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = limits[name]
            if not low <= value <= high:
                raise ConfigError(field, value, f"a value from {low} to {high}")


def make_selection_policy(selector: dict[str, Any], trust_remote_code: bool = False) -> SelectionPolicy:
    """Build the policy a config's ``omnikv.selector`` section describes."""
    params = dict(selector)
    cls = resolve_policy_class(str(params.pop("type", "last")), trust_remote_code=trust_remote_code)
    check_arguments(cls, params, "omnikv.selector")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError("omnikv.selector", selector, f"arguments {cls.__name__} accepts ({exc})") from None


def make_eviction_policy(eviction: dict[str, Any], trust_remote_code: bool = False) -> EvictionPolicy:
    """Build the eviction policy a config's ``offload.eviction`` section describes."""
    params = dict(eviction)
    spec = str(params.pop("type", "lru"))
    cls = resolve_policy_class(spec, EVICTION_POLICIES, EvictionPolicy, EVICTION_FIELD, trust_remote_code)
    check_arguments(cls, params, "offload.eviction")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError("offload.eviction", eviction, f"arguments {cls.__name__} accepts ({exc})") from None
