"""The runtime's JSON config: a pydantic model, loading, and checks against a model's geometry.

Every section is optional; omitted fields take the defaults written here (and in README's config
reference). The seed OmniKV's flat format loads too (see :mod:`omnikv_runtime.legacy`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator

from omnikv_runtime.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
OFFLOAD_DEVICES = ("cpu", "none")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """Which model to load when `initialize` is not handed one."""

    name_or_path: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    device: str = "auto"
    max_context_len: StrictInt | None = Field(default=None, gt=0)
    quantization: Literal["none", "8bit", "4bit"] = "none"
    cpu_num_threads: StrictInt | None = Field(default=None, gt=0)

    @field_validator("quantization")
    @classmethod
    def _bitsandbytes_present(cls, value: str) -> str:
        if value != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("8bit/4bit loading needs bitsandbytes (`pip install bitsandbytes`, CUDA only); or 'none'")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


class SelectorSection(BaseModel):
    """The selection policy of the filter layers; extra keys go to the policy's constructor."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    type: str = "last"
    window_size: StrictInt | None = Field(default=None, gt=0)  # None: the policy's own default

    def policy_arguments(self) -> dict[str, Any]:
        """What builds the policy: the type and only the fields the config set."""
        return {"type": self.type, **self.model_dump(exclude_unset=True, exclude_none=True)}


class OmniKVSection(_Section):
    """Filter layers, wait layers, token budget, tail and selector.

    ``tail_tokens``: how many of the most recent generated tokens every sparse layer sees besides
    its selection (the tail ring). Older generated tokens become selectable context, like the
    prompt. None (default): every generated token stays visible, as in the original OmniKV.
    """

    enabled: bool = True
    filter_layers: list[StrictInt] = Field(default_factory=lambda: [2, 8, 18])
    wait_layers: StrictInt = Field(default=1, ge=0)
    token_budget: StrictInt | StrictFloat = 0.067
    min_token_budget: StrictInt = Field(default=64, ge=1)
    tail_tokens: StrictInt | None = Field(default=None, gt=0)
    selector: SelectorSection = Field(default_factory=SelectorSection)

    @field_validator("filter_layers")
    @classmethod
    def _sorted_unique(cls, layers: list[int]) -> list[int]:
        if not layers:
            raise ValueError("give at least one filter layer (or set omnikv.enabled = false)")
        if any(layer < 0 for layer in layers):
            raise ValueError("layer indices start at 0")
        if len(set(layers)) != len(layers):
            raise ValueError("filter layers must not repeat")
        if layers != sorted(layers):
            raise ValueError("filter layers must be listed in increasing order")
        return layers

    @field_validator("token_budget")
    @classmethod
    def _positive_budget(cls, budget: int | float) -> int | float:
        if isinstance(budget, int) and budget <= 0:
            raise ValueError("a token count must be at least 1")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError("a fraction of the prompt must lie in (0, 1]; for a token count write an integer")
        return budget

    @field_validator("selector", mode="before")
    @classmethod
    def _selector_from_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    def budget_tokens(self, context_len: int) -> int:
        """How many context tokens a sparse layer sees for a context of `context_len` tokens."""
        if isinstance(self.token_budget, float):
            wanted = max(math.ceil(self.token_budget * context_len), self.min_token_budget)
        else:
            wanted = self.token_budget
        return max(0, min(wanted, context_len))


class EvictionSection(BaseModel):
    """The hot cache's eviction policy; extra keys go to the policy's constructor."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    type: str = "lru"


class OffloadSection(_Section):
    """Where the full KV of the sparse layers lives: host memory ("cpu") or the GPU ("none").

    ``hot_cache_tokens`` > 0 keeps that many recently fetched rows per segment on the GPU, so a
    step fetches only the selected rows it does not hold (2-4x the token budget is a good size).
    """

    device: Literal["cpu", "none"] = "cpu"
    pin_memory: bool = True
    transfer: Literal["auto", "torch", "triton"] = "auto"
    hot_cache_tokens: StrictInt = Field(default=0, ge=0)
    eviction: EvictionSection = Field(default_factory=EvictionSection)

    @field_validator("eviction", mode="before")
    @classmethod
    def _eviction_from_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value


class PrefillSection(_Section):
    """Chunked prefill keeps activation memory flat; null runs the prompt in one forward."""

    chunk_size: StrictInt | None = Field(default=4096, gt=0)


class GenerationSection(_Section):
    """Defaults for `Engine.generate` and the CLI.

    ``cuda_graphs``: on CUDA, capture the decode step once and replay it for every token (the
    step then costs GPU time, not Python and kernel-launch time). A request the captured step
    cannot run (beam search, a logits processor, a policy that is not graph-safe) decodes step by
    step instead, with one log line saying why. ``check_every``: tokens between the host's checks
    for finished rows (the only synchronisation of the decode loop). ``fused_layers``: run
    Llama-architecture decoder layers through fused kernels (RMSNorm, rotary embedding, SiLU-gated
    MLP) while the runtime's cache drives them; ``"auto"`` on CUDA, where they save ~25 small
    kernels per layer and step. The result equals the unfused layer up to rounding (RMSNorm sums
    in another order); ``false`` keeps transformers' own kernels, bit for bit.
    """

    max_new_tokens: StrictInt = Field(default=32, gt=0)
    cuda_graphs: bool = True
    fused_layers: StrictBool | Literal["auto"] = "auto"
    check_every: StrictInt = Field(default=16, gt=0)
    use_chat_template: bool = True
    cot: bool = False


class ProfilingSection(_Section):
    """The memory profiler (``omnikv profile``, ``omnikv run --profile-memory``, ``okv.profile_memory``)."""

    interval_ms: StrictFloat | StrictInt = Field(default=10, gt=0)
    trace: bool = True  # a torch.profiler Chrome trace next to report.json
    png: bool = True  # the timeline plot (needs matplotlib)


class OmniKVConfig(_Section):
    """The whole config. Build it with :func:`load_config`."""

    model: ModelSection = Field(default_factory=ModelSection)
    omnikv: OmniKVSection = Field(default_factory=OmniKVSection)
    offload: OffloadSection = Field(default_factory=OffloadSection)
    prefill: PrefillSection = Field(default_factory=PrefillSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    profiling: ProfilingSection = Field(default_factory=ProfilingSection)

    def check_for_model(self, num_layers: int) -> None:
        """Raise ConfigError if the filter and wait layers do not fit a model of `num_layers` layers."""
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
        for layer, next_bound in zip(layers, bounds):
            if layer + wait + 1 >= next_bound:
                what = f"filter layer {next_bound}" if next_bound < num_layers else "the last layer"
                raise ConfigError(
                    "omnikv.wait_layers",
                    wait,
                    f"filter layer {layer} plus {wait} wait layer(s) reaches {what}, leaving no sparse layer "
                    f"in that segment; use fewer wait layers or spread the filter layers",
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data."""
        return self.model_dump(mode="json")


def _dotted(config_cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Turn a pydantic error location into a dotted field path, dropping union tags like 'int'."""
    parts: list[str] = []
    cls: type[BaseModel] | None = config_cls
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else str(item)
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


def _config_error(exc: ValidationError) -> ConfigError:
    """The first pydantic error of `exc` as a ConfigError naming field, value and what is allowed."""
    error = exc.errors()[0]
    field = _dotted(OmniKVConfig, tuple(error["loc"]))
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        *section, key = field.split(".")
        known = _section_fields(OmniKVConfig, section)
        where = f"section '{'.'.join(section)}'" if section else "the top level"
        return ConfigError(field, value, f"unknown key in {where}{did_you_mean(key, known)}; known: {known}")
    message = error["msg"].removeprefix("Value error, ")
    return ConfigError(field, value, message)


def _bundled_config(name: str) -> Path | None:
    """The path of a config shipped with the package (`default`, `dense`, ...), if there is one."""
    try:
        candidate = resources.files("omnikv_runtime.configs").joinpath(f"{name}.json")
    except ModuleNotFoundError:
        return None
    return Path(str(candidate)) if candidate.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            "<file>", str(path), f"valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError("<file>", str(path), "a JSON object at the top level")
    return data


def load_config(source: str | Path | dict[str, Any] | OmniKVConfig | None = None) -> OmniKVConfig:
    """Load and validate a config from a JSON path, a bundled name, a dict, or an OmniKVConfig.

    The seed OmniKV's flat format (``do_select_layers``, ``num_of_selected_tokens``, ...) is
    recognised and mapped onto the same model. Raises :class:`ConfigError` on any bad field.
    """
    from omnikv_runtime.legacy import from_legacy, is_legacy

    if source is None:
        return OmniKVConfig()
    if isinstance(source, OmniKVConfig):
        return source.model_copy(deep=True)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            bundled = _bundled_config(str(source)) if not path.suffix else None
            if bundled is None:
                raise ConfigError("<file>", str(source), "a path to an existing JSON file or a bundled config name")
            path = bundled
        data = _read_json(path)
    elif isinstance(source, dict):
        data = dict(source)
    else:
        raise ConfigError("<config>", type(source).__name__, "a path, a dict or an OmniKVConfig")
    if is_legacy(data):
        data = from_legacy(data)
    try:
        config = OmniKVConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None
    from omnikv_runtime.policies import make_eviction_policy, make_selection_policy

    # unknown selector or bad arguments: ConfigError; unset fields leave the policy's own defaults
    make_selection_policy(config.omnikv.selector.policy_arguments())
    make_eviction_policy(config.offload.eviction.model_dump())
    return config
