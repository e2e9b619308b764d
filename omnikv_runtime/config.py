"""The runtime's JSON config: a pydantic model, loading, and checks against a model's geometry.

Every section is optional; omitted fields take the defaults written here (and in README's config
reference). The seed OmniKV's flat format loads too (see :mod:`omnikv_runtime.legacy`).
"""

from __future__ import annotations

import importlib.util
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator

from omnikv_runtime.config_io import read_json, validation_error
from omnikv_runtime.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
OFFLOAD_DEVICES = ("cpu", "none")
# Upper bounds of sizes, checked at load: a size past them cannot be meant and would allocate or
# loop without end. 16M tokens is past every supported model's context.
MAX_TOKENS = 1 << 24
MAX_LAYERS = 1024
MAX_THREADS = 1024
MAX_WINDOW = 4096  # queries a selection policy may score per step (a window of queries is kept per segment)
MAX_INTERVAL_MS = 60_000.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """Which model to load when `initialize` is not handed one."""

    name_or_path: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    device: str = "auto"
    max_context_len: StrictInt | None = Field(default=None, gt=0, le=MAX_TOKENS)
    quantization: Literal["none", "8bit", "4bit"] = "none"
    cpu_num_threads: StrictInt | None = Field(default=None, gt=0, le=MAX_THREADS)

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
    window_size: StrictInt | None = Field(default=None, gt=0, le=MAX_WINDOW)  # None: the policy's own default

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
    wait_layers: StrictInt = Field(default=1, ge=0, le=MAX_LAYERS)
    token_budget: StrictInt | StrictFloat = 0.067
    min_token_budget: StrictInt = Field(default=64, ge=1, le=MAX_TOKENS)
    tail_tokens: StrictInt | None = Field(default=None, gt=0, le=MAX_TOKENS)
    selector: SelectorSection = Field(default_factory=SelectorSection)

    @field_validator("filter_layers")
    @classmethod
    def _sorted_unique(cls, layers: list[int]) -> list[int]:
        if not layers:
            raise ValueError("give at least one filter layer (or set omnikv.enabled = false)")
        if any(layer < 0 for layer in layers):
            raise ValueError("layer indices start at 0")
        if any(layer >= MAX_LAYERS for layer in layers):
            raise ValueError(f"layer indices below {MAX_LAYERS}")
        if len(set(layers)) != len(layers):
            raise ValueError("filter layers must not repeat")
        if layers != sorted(layers):
            raise ValueError("filter layers must be listed in increasing order")
        return layers

    @field_validator("token_budget")
    @classmethod
    def _positive_budget(cls, budget: int | float) -> int | float:
        if isinstance(budget, int) and not 0 < budget <= MAX_TOKENS:
            raise ValueError(f"a token count must be at least 1 and at most {MAX_TOKENS}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError("a fraction of the prompt must lie in (0, 1]; for a token count write an integer")
        return budget

    @field_validator("selector", mode="before")
    @classmethod
    def _selector_from_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    def budget_tokens(self, context_len: int) -> int:
        """How many context tokens a sparse layer sees for a context of `context_len` tokens.

        A fraction rounds down, ``int(fraction * context_len)``, as the original OmniKV does, and is
        then raised to ``min_token_budget`` (a floor the original does not have).
        """
        if isinstance(self.token_budget, float):
            wanted = max(int(self.token_budget * context_len), self.min_token_budget)
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

    ``host_dtype``: how the host tier stores keys and values. ``"auto"``: the model's dtype.
    ``"float8_e4m3fn"``: one byte per element plus a float32 scale per token and KV head, so the
    host tier holds about twice the tokens and each step moves about half the bytes; rows are
    dequantized to the model's dtype as they are fetched.
    """

    device: Literal["cpu", "none"] = "cpu"
    pin_memory: bool = True
    transfer: Literal["auto", "torch", "triton"] = "auto"
    hot_cache_tokens: StrictInt = Field(default=0, ge=0, le=MAX_TOKENS)
    host_dtype: Literal["auto", "float8_e4m3fn"] = "auto"
    eviction: EvictionSection = Field(default_factory=EvictionSection)

    @field_validator("eviction", mode="before")
    @classmethod
    def _eviction_from_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value


class PrefillSection(_Section):
    """Chunked prefill keeps activation memory flat; null runs the prompt in one forward."""

    chunk_size: StrictInt | None = Field(default=4096, gt=0, le=MAX_TOKENS)


class GenerationSection(_Section):
    """Defaults for `Engine.generate` and the CLI.

    ``cuda_graphs``: on CUDA, capture the decode step once and replay it for every token (the
    step then costs GPU time, not Python and kernel-launch time). A request the captured step
    cannot run (beam search, a logits processor, a policy that is not graph-safe) decodes step by
    step instead, with one log line saying why. ``check_every``: tokens between the host's checks
    for finished rows (the only synchronisation of the decode loop). ``fused_layers``: run
    Llama-architecture decoder layers through fused kernels (RMSNorm, rotary embedding, SiLU-gated
    MLP) while the runtime's cache drives them; ``"auto"`` on CUDA, where they save ~25 small
    kernels per layer and step. The result stays within one rounding of the unfused layer (on
    CPU it is the same); ``false`` keeps transformers' own kernels, bit for bit.
    """

    max_new_tokens: StrictInt = Field(default=32, gt=0, le=MAX_TOKENS)
    cuda_graphs: bool = True
    fused_layers: StrictBool | Literal["auto"] = "auto"
    check_every: StrictInt = Field(default=16, gt=0, le=MAX_TOKENS)
    use_chat_template: bool = True
    cot: bool = False


class ProfilingSection(_Section):
    """The memory profiler (``omnikv profile``, ``omnikv run --profile-memory``, ``okv.profile_memory``)."""

    interval_ms: StrictFloat | StrictInt = Field(default=10, ge=1, le=MAX_INTERVAL_MS)  # NaN and inf fail the bounds
    trace: bool = True  # a torch.profiler Chrome trace next to report.json
    png: bool = True  # the timeline plot (needs matplotlib)


class DistributedSection(_Section):
    """Tensor parallelism through DeepSpeed (``pip install omnikv-runtime[deepspeed]``).

    ``tp_size``: ranks that split each layer's heads (DeepSpeed's AutoTP); each rank holds, in
    every tier, the KV of its own KV heads, and the filter layers' scores are reduced over the
    group so that every rank selects the same tokens. Run under ``deepspeed --num_gpus N`` or
    ``torchrun --nproc-per-node N``. ``backend``: the process group's, ``"auto"`` = NCCL on CUDA,
    gloo on CPU.
    """

    tp_size: StrictInt = Field(default=1, ge=1, le=1024)
    backend: Literal["auto", "nccl", "gloo"] = "auto"


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


def _config_path(source: str | Path) -> Path:
    path = Path(source)
    try:
        if path.is_file():
            return path
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise ConfigError("<file>", str(source), f"a path to an existing JSON file ({exc})") from None
    bundled = _bundled_config(str(source)) if not path.suffix and "/" not in str(source) else None
    if bundled is None:
        raise ConfigError("<file>", str(source), "a path to an existing JSON file or a bundled config name")
    return bundled


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
            path = _config_path(source)
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
    from omnikv_runtime.legacy import from_legacy, is_legacy, seed_key_of

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
