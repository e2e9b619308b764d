"""The config's sections: each field with its type, bounds, default and description.

:mod:`omnikv_runtime.config` assembles them into :class:`~omnikv_runtime.config.OmniKVConfig` and
loads configs; import the sections from there. Each field's ``description`` is the one account of
what it means (README's config reference is generated from them by :mod:`omnikv_runtime.config.doc`).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from omnikv_runtime.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
OFFLOAD_DEVICES = ("cpu", "none")
# how the host tier stores KV: the model's dtype, or FP8 codes with a scale per group (torch's dtype names)
HostDtype = Literal["auto", "float8_e4m3fn"]
HOST_DTYPES: tuple[str, ...] = get_args(HostDtype)
# Upper bounds of sizes, checked at load: a size past them cannot be meant and would allocate or
# loop without end. 16M tokens is past every supported model's context.
MAX_TOKENS = 1 << 24
MAX_LAYERS = 1024
MAX_THREADS = 1024
MAX_WINDOW = 4096  # queries a selection policy may score per step (a window of queries is kept per segment)
MAX_INTERVAL_MS = 60_000.0


BITSANDBYTES_MISSING = "8-bit/4-bit loading needs bitsandbytes (`pip install bitsandbytes`, CUDA only)"


def bitsandbytes_installed() -> bool:
    """Whether 8-bit/4-bit loading can work here (bitsandbytes importable); CUDA is checked at load."""
    return importlib.util.find_spec("bitsandbytes") is not None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """Which model to load when `initialize` is not handed one."""

    name_or_path: str = Field(
        default="smollm2-135m",
        description="bundled model name, local HF folder, or `.gguf` file (used when `initialize` gets no model)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="`float32`, `bfloat16` or `float16`"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="base attention under OmniKV: `sdpa`, `eager`, `flash_attention_2` (needs flash-attn)",
    )
    device: str = Field(default="auto", description="`auto` (CUDA if present), `cpu`, `cuda`, `cuda:N`")
    max_context_len: StrictInt | None = Field(
        default=None,
        gt=0,
        le=MAX_TOKENS,
        description="refuse prompts + new tokens longer than this (the model's own limit always applies)",
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        default="none", description="`8bit`/`4bit` need bitsandbytes (CUDA)"
    )
    cpu_num_threads: StrictInt | None = Field(
        default=None,
        gt=0,
        le=MAX_THREADS,
        description="torch threads of the `omnikv` commands' CPU runs; `null`: one fewer than the cores "
        "(at least 1), or `OMP_NUM_THREADS` if set",
    )

    @field_validator("quantization")
    @classmethod
    def _bitsandbytes_present(cls, value: str) -> str:
        if value != "none" and not bitsandbytes_installed():
            raise ValueError(f"{BITSANDBYTES_MISSING}; or 'none'")
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

    type: str = Field(
        default="last",
        description=(
            "`last`, `softmax_last` (the seed's `softmax_before_last`, also accepted), `uniform`, `exp`, `full`, "
            'baselines `streaming_llm`, `h2o`, `snapkv`, `quest`, `infllm`, or `"package.module:Class"` '
            "(docs/policies.md; needs `trust_remote_code`)"
        ),
    )
    window_size: StrictInt | None = Field(
        default=None,
        gt=0,
        le=MAX_WINDOW,
        description=(
            "recent queries a window policy scores (`uniform`, `exp`: 16; `snapkv`: 32; `h2o`: 4096); `null`: the "
            "policy's own. Other keys are the policy's own parameters; a key it does not take is refused"
        ),
    )

    def policy_arguments(self) -> dict[str, Any]:
        """What builds the policy: the type and only the fields the config set."""
        return {"type": self.type, **self.model_dump(exclude_unset=True, exclude_none=True)}


class OmniKVSection(_Section):
    """Filter layers, wait layers, token budget, tail and selector."""

    enabled: bool = Field(
        default=True, description="`false` runs the plain model through the same engine (the dense baseline)"
    )
    filter_layers: list[StrictInt] = Field(
        default_factory=lambda: [2, 8, 18], description="increasing, unique layer indices inside the model"
    )
    wait_layers: StrictInt = Field(
        default=1,
        ge=0,
        le=MAX_LAYERS,
        description=(
            "dense layers after each filter layer (they hide the fetch); a segment they leave without a sparse layer "
            "(adjacent filter layers such as `[2, 3]`) runs dense, as in the seed, with one log line"
        ),
    )
    token_budget: StrictInt | StrictFloat = Field(
        default=0.067,
        description=(
            "tokens a sparse layer sees: an integer count, or a float in (0, 1] = fraction of the prompt, rounded "
            "down (`int(fraction × prompt tokens)`, as in the seed)"
        ),
    )
    min_token_budget: StrictInt = Field(
        default=64,
        ge=0,
        le=MAX_TOKENS,
        description=(
            "a fractional budget never selects fewer tokens than this (short prompts then run dense); 0: no floor, "
            "as in the seed (what a seed-format config gets unless it sets this field)"
        ),
    )
    tail_tokens: StrictInt | None = Field(
        default=None,
        gt=0,
        le=MAX_TOKENS,
        description=(
            "generated tokens every sparse layer sees besides its selection (the tail ring); older ones join the "
            "selectable context. `null`: all of them, as in the seed"
        ),
    )
    selector: SelectorSection = Field(
        default_factory=SelectorSection, description="the filter layers' selection policy (a name, or the object below)"
    )

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

    def token_budget_for(self, context_len: int) -> int:
        """How many context tokens a sparse layer sees for a context of `context_len` tokens.

        A fraction rounds down, ``int(fraction * context_len)``, as the original OmniKV does, and is
        then raised to ``min_token_budget`` (a floor the original does not have; seed-format configs
        get 0, no floor).
        """
        if isinstance(self.token_budget, float):
            wanted = max(int(self.token_budget * context_len), self.min_token_budget)
        else:
            wanted = self.token_budget
        return max(0, min(wanted, context_len))


class EvictionSection(BaseModel):
    """The hot cache's eviction policy; extra keys go to the policy's constructor."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    type: str = Field(
        default="lru",
        description='which hot-cache rows make room: `lru`, `lfu`, `none` (never evict), or `"package.module:Class"`',
    )


_NEED_CPU_OFFLOAD = ("device", "host_dtype", "hot_cache_tokens")  # the offload device, and what needs "cpu"


class OffloadSection(_Section):
    """Where the full KV of the sparse layers lives: host memory ("cpu") or the GPU ("none").

    An FP8 host tier (``host_dtype``) holds about twice the tokens of the model's dtype, and each
    step moves about half the bytes; rows are dequantized to the model's dtype as they are fetched.
    """

    device: Literal["cpu", "none"] = Field(
        default="cpu",
        description="`cpu`: full KV of sparse layers in host memory; `none`: on the GPU (sparse attention, no PCIe)",
    )
    pin_memory: bool = Field(
        default=True,
        description=(
            "pin the host tier at its exact size (`cudaHostRegister`; CUDA only; falls back to pageable memory with a"
            " warning)"
        ),
    )
    transfer: Literal["auto", "torch", "triton"] = Field(
        default="auto", description="`triton` (CUDA: Triton gather on a side stream), `torch` (anywhere), `auto` picks"
    )
    hot_cache_tokens: StrictInt = Field(
        default=0,
        ge=0,
        le=MAX_TOKENS,
        description=(
            "rows per segment kept on the GPU from earlier fetches; each step fetches only the rows it lacks (`cpu` "
            "offload only; 2-4x the token budget; 0 = off)"
        ),
    )
    host_dtype: HostDtype = Field(
        default="auto",
        description=(
            "how the host tier stores keys (after RoPE) and values: `auto` (the model's dtype) or `float8_e4m3fn` "
            "(FP8 codes plus a float32 scale per token and KV head: about half the host bytes and PCIe bytes per "
            "step; dequantized on the GPU as rows are fetched; `cpu` offload only)"
        ),
    )
    eviction: EvictionSection = Field(
        default_factory=EvictionSection, description="the hot cache's eviction policy (a name, or the object below)"
    )

    @field_validator("eviction", mode="before")
    @classmethod
    def _eviction_from_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _host_tier_options_need_cpu_offload(cls, data: Any) -> Any:
        """An FP8 host tier and the hot cache serve rows fetched from host memory: with ``device = "none"``
        attention reads every row in place on the GPU, so neither has anything to do.

        Checked before the fields, on the section's data (at load, and on an assignment with the new value in
        it, so that a refused assignment leaves the section as it was); a value of the wrong type or out of
        bounds is left to its field's own check.
        """
        if not isinstance(data, dict):
            return data
        device, host_dtype, hot = (data.get(name, cls.model_fields[name].default) for name in _NEED_CPU_OFFLOAD)
        if device != "none":
            return data
        if host_dtype in HOST_DTYPES and host_dtype != "auto":
            raise ConfigError(
                "offload.host_dtype",
                host_dtype,
                "'auto' with offload.device = 'none' (an FP8 tier is a host tier: set offload.device = 'cpu')",
            )
        if type(hot) is int and 0 < hot <= MAX_TOKENS:
            raise ConfigError(
                "offload.hot_cache_tokens",
                hot,
                "0 with offload.device = 'none' (every row is on the GPU already: the hot cache keeps rows fetched "
                "from host memory, with offload.device = 'cpu')",
            )
        return data


class PrefillSection(_Section):
    """Chunked prefill keeps activation memory flat; null runs the prompt in one forward.

    A chunk after the first attends to the sparse layers' earlier tokens by reading them back from
    the host tier ``read_block_tokens`` at a time (the next block is read while one is computed), so
    the GPU memory a chunk needs does not grow with the context.
    """

    chunk_size: StrictInt | None = Field(
        default=4096, gt=0, le=MAX_TOKENS, description="prompt tokens per prefill forward; `null` for one forward"
    )
    read_block_tokens: StrictInt = Field(
        default=4096,
        gt=0,
        le=MAX_TOKENS,
        description=(
            "earlier tokens of a sparse layer read back from the host tier at a time while a prefill chunk attends "
            "to them (two blocks are on the GPU at once: the one computed and the next one read)"
        ),
    )


class GenerationSection(_Section):
    """Defaults for `Engine.generate` and the CLI.

    A request the captured decode step cannot run (beam search, a logits processor, a policy that
    is not graph-safe) decodes step by step instead, with one log line saying why. Fused layers
    save ~25 small kernels per layer and step on CUDA; their result stays within one rounding of
    the unfused layer (on CPU it is the same).
    """

    max_new_tokens: StrictInt = Field(default=32, gt=0, le=MAX_TOKENS, description="default for `generate` and the CLI")
    cuda_graphs: bool = Field(
        default=True, description='on CUDA, capture the decode step once and replay it per token (see "Decoding" below)'
    )
    fused_layers: StrictBool | Literal["auto"] = Field(
        default="auto",
        description=(
            "run Llama decoder layers through fused kernels (RMSNorm, rotary embedding, SiLU gate) while the "
            "runtime's cache drives them; `\"auto\"`: on CUDA; `false`: transformers' kernels, bit for bit"
        ),
    )
    batch_invariant: StrictBool = Field(
        default=False,
        description=(
            "with fused layers, a decode step's projections and LM head run through a kernel whose rows have the "
            "same bits whatever the batch, and the server prefills each request's chunks in forwards of their own, "
            "so a request's greedy tokens do not depend on what else the server runs beside it"
        ),
    )
    check_every: StrictInt = Field(
        default=16,
        gt=0,
        le=MAX_TOKENS,
        description="tokens between the decode loop's checks for finished rows (its only host synchronisation)",
    )
    use_chat_template: bool = Field(default=True, description="wrap CLI prompts in the tokenizer's chat template")
    cot: bool = Field(
        default=False, description="two-stage chain-of-thought questions (used by the evaluation harness)"
    )


class ProfilingSection(_Section):
    """The memory profiler (``omnikv profile``, ``omnikv run --profile-memory``, ``okv.profile_memory``)."""

    interval_ms: StrictFloat | StrictInt = Field(  # NaN and inf fail the bounds
        default=10,
        ge=1,
        le=MAX_INTERVAL_MS,
        description=(
            "the memory profiler's sampling interval (`omnikv profile`, `omnikv run --profile-memory`, "
            "`okv.profile_memory`)"
        ),
    )
    trace: bool = Field(
        default=True, description="write a torch.profiler Chrome trace (`trace.json.gz`) next to `report.json`"
    )
    png: bool = Field(default=True, description="draw the timeline plot (`timeline.png`; needs matplotlib)")


class DistributedSection(_Section):
    """Tensor parallelism and ZeRO-Inference weight offload (``pip install omnikv-runtime[deepspeed]``).

    Each rank holds, in every tier, the KV of its own KV heads, and the filter layers' scores are
    reduced over the group so that every rank selects the same tokens.
    """

    tp_size: StrictInt = Field(
        default=1,
        ge=1,
        le=1024,
        description=(
            "ranks that split each layer's heads (tensor parallelism through DeepSpeed AutoTP; run under `deepspeed "
            "--num_gpus N` or `torchrun --nproc-per-node N`; see docs/multi_gpu.md)"
        ),
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="the process group's backend: `auto` (NCCL on CUDA, gloo on CPU), `nccl` or `gloo`"
    )
    float32_partial_sums: StrictBool = Field(
        default=False,
        description=(
            "with tp_size > 1: AutoTP's row-parallel layers (attention output, MLP down projection, LM head) keep "
            "each rank's partial sum in float32, all-reduce it in float32 and round once to the weights' dtype, as "
            "one GPU rounds its whole sum once; off, each rank rounds its partial sum to bf16 before the all-reduce "
            "(no effect in float32 or with one rank; see docs/multi_gpu.md)"
        ),
    )
    offload_weights: StrictBool = Field(
        default=False,
        description=(
            "ZeRO-Inference: keep the weights in pinned host memory and stream them in layer by layer through "
            "DeepSpeed ZeRO stage 3, beside OmniKV's KV offload (one rank; decode runs without a CUDA graph and "
            "without fused layers; see docs/multi_gpu.md)"
        ),
    )
