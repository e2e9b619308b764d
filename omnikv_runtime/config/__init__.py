"""The runtime's JSON config: a pydantic model, loading, and checks against a model's geometry.

Every section is optional; omitted fields take the defaults written here. Each field's
``description`` is the one account of what it means: README's config reference is generated from
them (:mod:`omnikv_runtime.config.doc`). The seed OmniKV's flat format loads too (see
:mod:`omnikv_runtime.config.legacy`).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from omnikv_runtime.config.io import FILE, read_json, validation_error
from omnikv_runtime.config.legacy import from_legacy, is_legacy, seed_key_of
from omnikv_runtime.config.sections import (
    ATTN_IMPLEMENTATIONS,
    BITSANDBYTES_MISSING,
    DTYPES,
    HOST_DTYPES,
    MAX_INTERVAL_MS,
    MAX_LAYERS,
    MAX_THREADS,
    MAX_TOKENS,
    MAX_WINDOW,
    OFFLOAD_DEVICES,
    DistributedSection,
    EvictionSection,
    GenerationSection,
    ModelSection,
    OffloadSection,
    OmniKVSection,
    PrefillSection,
    ProfilingSection,
    SelectorSection,
    _Section,
    bitsandbytes_installed,
)
from omnikv_runtime.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "BITSANDBYTES_MISSING",
    "DTYPES",
    "DistributedSection",
    "EvictionSection",
    "GenerationSection",
    "HOST_DTYPES",
    "MAX_INTERVAL_MS",
    "MAX_LAYERS",
    "MAX_THREADS",
    "MAX_TOKENS",
    "MAX_WINDOW",
    "ModelSection",
    "OFFLOAD_DEVICES",
    "OffloadSection",
    "OmniKVConfig",
    "OmniKVSection",
    "PrefillSection",
    "ProfilingSection",
    "SelectorSection",
    "bitsandbytes_installed",
    "load_config",
]


class OmniKVConfig(_Section):
    """The whole config. Build it with :func:`load_config`."""

    model: ModelSection = Field(default_factory=ModelSection)
    omnikv: OmniKVSection = Field(default_factory=OmniKVSection)
    offload: OffloadSection = Field(default_factory=OffloadSection)
    prefill: PrefillSection = Field(default_factory=PrefillSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    profiling: ProfilingSection = Field(default_factory=ProfilingSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    def check_for_model(self, num_layers: int) -> None:
        """Raise ConfigError if a filter layer lies past the last of the model's `num_layers` layers.

        A segment left without a sparse layer (adjacent filter layers such as ``[2, 3]``, or wait
        layers reaching the next filter layer) runs dense, as in the original OmniKV: one log line
        says so.
        """
        if not self.omnikv.enabled:
            return
        layers = self.omnikv.filter_layers
        wait = self.omnikv.wait_layers
        for layer in layers:
            if layer >= num_layers:
                raise ConfigError(
                    "omnikv.filter_layers", layers, f"layer indices 0..{num_layers - 1} (the model has {num_layers})"
                )
        bounds = [*layers[1:], num_layers]
        dense = [(layer, bound) for layer, bound in zip(layers, bounds) if layer + wait + 1 >= bound]
        for layer, bound in dense:
            logger.info(
                "filter layer %d: its segment (layers %d..%d) has no sparse layer after %d wait layer(s), so "
                "it runs dense",
                layer,
                layer,
                bound - 1,
                wait,
            )
        if len(dense) == len(layers):
            logger.warning(
                "omnikv.filter_layers %s with %d wait layer(s) leave no sparse layer in a %d-layer model: "
                "every layer runs dense",
                layers,
                wait,
                num_layers,
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data."""
        return self.model_dump(mode="json")


def _bundled_config(name: str) -> Path | None:
    """The path of a config shipped with the package (`default`, `dense`, ...), if there is one."""
    try:
        candidate = resources.files("omnikv_runtime.configs").joinpath(f"{name}.json")
        return Path(str(candidate)) if candidate.is_file() else None
    except (ModuleNotFoundError, OSError, ValueError):  # no such package; a name no file can have
        return None


def bundled_config_names() -> list[str]:
    """The names of the configs shipped with the package (``default``, ``dense``, ...)."""
    try:
        entries = resources.files("omnikv_runtime.configs").iterdir()
        return sorted(entry.name.removesuffix(".json") for entry in entries if entry.name.endswith(".json"))
    except (ModuleNotFoundError, OSError):
        return []


def config_path(source: str | Path, field: str = FILE) -> Path:
    """The file that a config path or a bundled name stands for.

    Reads nothing and imports nothing heavy, so the command line checks ``--config`` with it before
    loading torch. A path that does not exist is a :class:`ConfigError` naming ``field`` that says
    "no such file" (with the bundled names, and the closest one to a mistyped name).
    """
    path = Path(source)
    try:
        if path.is_file():
            return path
        is_folder = path.is_dir()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise ConfigError(field, str(source), f"a path to an existing JSON file ({exc})") from None
    bare_name = not path.suffix and "/" not in str(source)
    bundled = _bundled_config(str(source)) if bare_name else None
    if bundled is not None:
        return bundled
    names = bundled_config_names()
    problem = "a folder, not a file" if is_folder else "no such file"
    if bare_name and not is_folder:
        problem = f"no such file or bundled config{did_you_mean(str(source), names)}"
    allowed = f"a path to an existing JSON file or a bundled config name ({', '.join(names)})"
    raise ConfigError(field, str(source), allowed, problem=problem)


def load_config(
    source: str | Path | dict[str, Any] | OmniKVConfig | None = None, trust_remote_code: bool = False
) -> OmniKVConfig:
    """Load and validate a config from a JSON path, a bundled name, a dict, or an OmniKVConfig.

    The seed OmniKV's flat format (``do_select_layers``, ``num_of_selected_tokens``, ...) is
    recognised and mapped onto the same model. Raises :class:`ConfigError` on any bad field; for a
    file, the error names it.

    ``trust_remote_code``: a selector or eviction ``type`` written as ``"module:Class"`` imports that
    module, running its code, only when this is True (otherwise a ConfigError says how to opt in).
    """
    path: Path | None = None
    try:
        if source is None:
            return OmniKVConfig()
        if isinstance(source, (str, Path)):
            path = config_path(source)
            data: Any = read_json(path)
        elif isinstance(source, OmniKVConfig):
            return _check_policies(source.model_copy(deep=True), trust_remote_code)
        elif isinstance(source, dict):
            data = dict(source)
        else:
            raise ConfigError("<config>", type(source).__name__, "a path, a dict or an OmniKVConfig")
        return _validate(data, trust_remote_code)
    except ConfigError as error:
        raise (error.in_file(str(path)) if path is not None else error) from None
    except RecursionError:
        where = str(path) if path is not None else type(source).__name__
        raise ConfigError("<config>", where, "a config nested less deeply (it exceeds the recursion limit)") from None


def _validate(data: dict[str, Any], trust_remote_code: bool) -> OmniKVConfig:
    seed = is_legacy(data)
    if seed:
        data = from_legacy(data)
    try:
        config = OmniKVConfig.model_validate(data)
    except ValidationError as exc:
        error = validation_error(exc, OmniKVConfig)
        key = seed_key_of(error.field) if seed else None
        if key is None:
            raise error from None
        raise ConfigError(key, error.value, f"{error.allowed} (it sets {error.field} here)") from None
    return _check_policies(config, trust_remote_code)


def _check_policies(config: OmniKVConfig, trust_remote_code: bool) -> OmniKVConfig:
    """Build the config's policies once: an unknown type or a bad argument is a ConfigError."""
    from omnikv_runtime.policies import make_eviction_policy, make_selection_policy

    # unset fields leave the policy's own defaults
    make_selection_policy(config.omnikv.selector.policy_arguments(), trust_remote_code)
    make_eviction_policy(config.offload.eviction.model_dump(), trust_remote_code)
    return config
