"""Look policies up by registered name or by ``"package.module:ClassName"``, and check their arguments.

A ``"module:Class"`` path imports that module, which runs its code: that happens only when the
caller opts in (``trust_remote_code=True``, as transformers does for code shipped with a model).
A class imported with the opt-in stays usable by its path for the rest of the process, as if
registered; no other module is imported without it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from omnikv_runtime.errors import ConfigError, did_you_mean
from omnikv_runtime.policies.base import SelectionPolicy
from omnikv_runtime.policies.eviction_base import EvictionPolicy
from omnikv_runtime.policies.params import check_arguments, parameters

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


def _check_registrable(cls: type, base: type) -> None:
    """TypeError unless `cls` is a concrete subclass of `base` with a name and declared parameters."""
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{cls!r} is not a subclass of {base.__name__}")
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} does not implement {_abstract(cls)}")
    if not isinstance(cls.name, str) or not cls.name or cls.name == base.name or ":" in cls.name:
        raise TypeError(f"{cls.__name__}.name must be its own registered name (no ':'), got {cls.name!r}")
    parameters(cls)  # refuses **kwargs: a policy declares what it takes


def register_selection_policy(cls: type[SelectionPolicy]) -> type[SelectionPolicy]:
    """Class decorator: register a selection policy under ``cls.name``."""
    _check_registrable(cls, SelectionPolicy)
    SELECTION_POLICIES[cls.name] = cls
    return cls


def register_eviction_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Class decorator: register an eviction policy under ``cls.name``."""
    _check_registrable(cls, EvictionPolicy)
    EVICTION_POLICIES[cls.name] = cls
    return cls


_SIGNATURES = {
    "select": "select(ctx)",
    "scores": "scores(ctx)",
    "rank": "rank(ctx, state)",
    "priority": "priority(state)",
}


def _abstract(cls: type) -> str:
    """The methods `cls` leaves abstract, as they are called."""
    return " and ".join(_SIGNATURES.get(name, f"{name}()") for name in sorted(cls.__abstractmethods__))


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
    if inspect.isabstract(cls):
        raise ConfigError(field, spec, f"a class that implements {_abstract(cls)} (it leaves it abstract)")
    try:
        parameters(cls)
    except TypeError as exc:
        raise ConfigError(field, spec, f"a class that declares its parameters ({exc})") from None
    _TRUSTED[(base, spec)] = cls
    return cls


def _build(cls: type, params: dict[str, Any], section: str, given: dict[str, Any]) -> Any:
    check_arguments(cls, params, section)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(section, given, f"arguments {cls.__name__} accepts ({exc})") from None


def make_selection_policy(selector: dict[str, Any], trust_remote_code: bool = False) -> SelectionPolicy:
    """Build the policy a config's ``omnikv.selector`` section describes."""
    params = dict(selector)
    cls = resolve_policy_class(str(params.pop("type", "last")), trust_remote_code=trust_remote_code)
    return _build(cls, params, "omnikv.selector", selector)


def make_eviction_policy(eviction: dict[str, Any], trust_remote_code: bool = False) -> EvictionPolicy:
    """Build the eviction policy a config's ``offload.eviction`` section describes."""
    params = dict(eviction)
    spec = str(params.pop("type", "lru"))
    cls = resolve_policy_class(spec, EVICTION_POLICIES, EvictionPolicy, EVICTION_FIELD, trust_remote_code)
    return _build(cls, params, "offload.eviction", eviction)
