"""The engine: wraps a transformers causal LM with the OmniKV attention function and tiered cache."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from omnikv_runtime.cache.adapter import OmniKVCache
from omnikv_runtime.cache.selector import Selector
from omnikv_runtime.cache.slots import SlotCache
from omnikv_runtime.cache.tiers import Tiers
from omnikv_runtime.config import OmniKVConfig, load_config
from omnikv_runtime.decode.loop import DecodeLoop, loop_settings
from omnikv_runtime.distributed import execution_device, offload_weights, tensor_parallel, tensor_parallel_group
from omnikv_runtime.engine.arguments import check_generate_call, with_generation_options
from omnikv_runtime.engine.guards import SUPPORTED_MODEL_TYPES, ExclusiveUse, check_supported
from omnikv_runtime.engine.patches import attach_model, detach_model
from omnikv_runtime.engine.stats import FirstDecodeTimer, RunRecord, memory_report, run_stats
from omnikv_runtime.errors import ConfigError, OmniKVError, PromptError
from omnikv_runtime.geometry import ModelGeometry
from omnikv_runtime.layout import LayerPlan, Role, reserve_tokens
from omnikv_runtime.listeners import EngineListener, Listeners
from omnikv_runtime.models.rotary import rotary_inverse_frequencies
from omnikv_runtime.policies import make_eviction_policy, make_selection_policy
from omnikv_runtime.transfer import make_transfer_engine

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_MODEL_TYPES", "Engine", "cache_keyword", "check_supported", "initialize"]


def cache_keyword(model: PreTrainedModel) -> str:
    """The argument under which `model`'s forward and ``generate`` take the cache: ``cache`` on
    transformers that renamed ``past_key_values`` (5.2x), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Engine:
    """OmniKV generation for one model. Build it with :func:`initialize`."""

    def __init__(
        self, model: PreTrainedModel, config: OmniKVConfig, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        check_supported(model)
        self.geometry = ModelGeometry.from_model(model)  # the whole model's (before any tensor-parallel split)
        self.num_layers = self.geometry.num_layers
        config.check_for_model(self.num_layers)
        model = tensor_parallel(model, config)  # itself unless distributed.tp_size > 1
        model = offload_weights(model, config)  # itself unless distributed.offload_weights
        self.tensor_parallel_group = tensor_parallel_group(config)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        section = config.omnikv
        self.plan = LayerPlan.build(self.num_layers, section.filter_layers, section.wait_layers, section.enabled)
        self.policy = make_selection_policy(section.selector.policy_arguments())
        if self.tensor_parallel_group is not None and not self.policy.tensor_parallel:
            raise ConfigError(
                "omnikv.selector.type",
                section.selector.type,
                "with distributed.tp_size > 1, a policy whose ranks agree on the selection: "
                "last, softmax_last, uniform, exp or full",
            )
        self.eviction = make_eviction_policy(config.offload.eviction.model_dump())
        self.hot_cache_tokens = config.offload.hot_cache_tokens  # 0 unless offload.device = "cpu" (the config's rule)
        self.device = execution_device(model, config)
        # attention, fused layers, prefill marks; detach() gives the model back its base attention
        self.listeners = Listeners()  # shared with every cache the engine makes
        self.base_attention, self.fused_layers = attach_model(model, config, self.device, self.listeners)
        offload = config.offload
        self.transfer = make_transfer_engine(
            self.device, offload.device, offload.pin_memory, offload.transfer, offload.host_dtype
        )
        self.max_positions = self.geometry.max_positions
        self.cache_keyword = cache_keyword(model)  # "cache" or "past_key_values", as model.generate takes it
        self.rope_inv_freq = rotary_inverse_frequencies(model, self.device)  # window queries are turned with them
        self.selector = Selector(
            self.policy, self.transfer, self.tensor_parallel_group, self.listeners, self.rope_inv_freq
        )
        self.detached = False
        self._last_cache: OmniKVCache | None = None
        self._last_run: RunRecord | None = None
        self._decode_loops: dict[int, DecodeLoop] = {}  # batch size -> a loop with a captured step, kept
        self._exclusive = ExclusiveUse()  # generate calls from several threads run one at a time
        if config.model.max_context_len:  # refuse at initialize what can never fit (CUDA)
            self.check_memory(1, config.model.max_context_len, 1)
        logger.info(
            "OmniKV plan for %d layers: %s (D dense, F filter, W wait, s sparse)", self.num_layers, self.plan.describe()
        )

    def new_cache(self, reserve_tokens: int = 0, prompt_tokens: int = 0) -> OmniKVCache:
        """A fresh tiered cache; also usable as ``model.generate(..., cache=cache)`` (older: ``past_key_values=``).

        ``reserve_tokens`` sizes the buffers up front (prompt + new tokens). ``prompt_tokens`` (the
        padded prompt length) keeps a chunked prefill whose last chunk is one token from being
        mistaken for a decode step; ``model.generate`` tells the cache by itself (the engine hooks
        its input preparation), so it is needed only when driving the model's forward by hand.
        """
        self._check_attached()
        cache = OmniKVCache(
            self.new_tiers(reserve_tokens),
            self.selector,
            self.config.omnikv.token_budget_for,
            prompt_tokens=prompt_tokens,
            tail_tokens=self.config.omnikv.tail_tokens,
            fused_layers=self.fused_layers,
            listeners=self.listeners,
        )
        self._last_cache = cache
        return cache

    def new_tiers(self, reserve_tokens: int = 0) -> Tiers:
        """Empty tiers for this engine's plan, transfer engine and hot cache (allocated on first use)."""
        return Tiers(
            self.plan,
            self.transfer,
            window_size=self.policy.window_size,
            reserve_tokens=reserve_tokens,
            hot_cache_tokens=self.hot_cache_tokens,
            eviction=self.eviction,
            read_block_tokens=self.config.prefill.read_block_tokens,
        )

    def new_slot_cache(self, rows: int, capacity: int, new_tokens: int) -> SlotCache:
        """A server's cache: ``rows`` independent requests of up to ``capacity`` columns, allocated now."""
        self._check_attached()
        geometry = self.geometry
        kv_heads = geometry.kv_heads // self.config.distributed.tp_size  # each rank holds its own heads
        return SlotCache(
            self.new_tiers(capacity),
            self.selector,
            self.config.omnikv.token_budget_for,
            rows,
            capacity,
            new_tokens,
            kv_heads,
            geometry.head_dim,
            next(self.model.parameters()).dtype,
            self.device,
            tail_tokens=self.config.omnikv.tail_tokens,
            fused_layers=self.fused_layers,
            listeners=self.listeners,
        )

    @property
    def last_cache(self) -> OmniKVCache | None:
        """The cache of the last generation (or the last one :meth:`new_cache` made)."""
        return self._last_cache

    @property
    def last_run(self) -> RunRecord | None:
        """The record of the last generation, whichever path ran it (None before the first)."""
        return self._last_run

    def add_listener(self, listener: EngineListener) -> None:
        """Call `listener` on the events of every cache this engine makes (see :mod:`omnikv_runtime.listeners`)."""
        if listener not in self.listeners:
            self.listeners.append(listener)

    def remove_listener(self, listener: EngineListener) -> None:
        """Stop calling `listener` (nothing happens if it was not registered)."""
        if listener in self.listeners:
            self.listeners.remove(listener)

    @contextlib.contextmanager
    def listening(self, listener: EngineListener) -> Iterator[EngineListener]:
        """``with engine.listening(listener):`` registers `listener` for the block."""
        self.add_listener(listener)
        try:
            yield listener
        finally:
            self.remove_listener(listener)

    def detach(self) -> None:
        """Give the model back as transformers runs it: its own attention implementation, its decoder
        layers' own forward, its own input preparation; kept decode loops are freed. The engine cannot
        generate afterwards (build a new one with :func:`initialize`). Detaching twice does nothing."""
        if self.detached:
            return
        self.release_graphs()
        detach_model(self.model, self.base_attention)
        self.detached = True

    def _check_attached(self) -> None:
        if self.detached:
            raise OmniKVError(
                "this engine was detached from its model (engine.detach()): build a new one with "
                "okv.initialize(model, config)"
            )

    def check_prompt(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise PromptError for an empty prompt or one that cannot fit the model's context."""
        if prompt_tokens == 0:
            raise PromptError("the prompt is empty: give at least one token")
        limits = []
        if self.max_positions:
            limits.append((self.max_positions, "the model's context (max_position_embeddings)"))
        if self.config.model.max_context_len:
            limits.append((self.config.model.max_context_len, "model.max_context_len in the config"))
        for limit, what in limits:
            if prompt_tokens + max_new_tokens > limit:
                raise PromptError(
                    f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens are asked for, "
                    f"{prompt_tokens + max_new_tokens} in all, over {what} of {limit}: shorten the prompt "
                    "or lower max_new_tokens"
                )

    def generate(
        self,
        input_ids: torch.Tensor | list[int] | list[list[int]],
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor | ModelOutput:
        """Generate through the tiered cache; returns prompt + new ids, like ``model.generate`` (its output
        object with ``return_dict_in_generate=True``).

        Greedy unless ``do_sample=True`` (then ``temperature``, ``top_k``, ``top_p``), stopping at
        ``eos_token_id`` or ``stop_strings``: these run in the engine's own loop (chunked prefill,
        then a static decode step replayed from a CUDA graph on CUDA). Anything else (beam search,
        logits processors, ...) goes to transformers' ``generate`` with the same cache, step by step.
        ``max_length`` (prompt + new) stands in for ``max_new_tokens``. Bad ids, masks or lengths raise
        PromptError before anything runs. Calls from several threads run one after the other.
        """
        self._check_attached()
        default_new = self.config.generation.max_new_tokens
        call = check_generate_call(self.model, default_new, input_ids, attention_mask, max_new_tokens, generate_kwargs)
        input_ids, attention_mask, max_new_tokens, generate_kwargs = call
        self.check_prompt(input_ids.shape[1], max_new_tokens)
        with self._exclusive.hold():
            return self._generate(input_ids, attention_mask, max_new_tokens, generate_kwargs)

    def _generate(self, input_ids, attention_mask, max_new_tokens: int, generate_kwargs: dict[str, Any]) -> Any:
        if self.tokenizer is not None and generate_kwargs.get("pad_token_id") is None:
            generate_kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        settings = loop_settings(self.model, self.tokenizer, generate_kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.inference_mode():
            if isinstance(settings, str):
                logger.info("generate runs step by step through transformers' generate: %s", settings)
                kwargs = with_generation_options(generate_kwargs, {"max_new_tokens": max_new_tokens})
                kwargs.update(input_ids=input_ids, attention_mask=attention_mask)
                return self.generate_stepwise(self.model.generate, input_ids, max_new_tokens, (), kwargs)
            batch, prompt = input_ids.shape
            self.transfer.reset_stats()
            start = time.perf_counter()
            loop = self._decode_loop(batch, prompt, max_new_tokens, *settings)
            loop.prefill(input_ids, attention_mask, self.config.prefill.chunk_size)
            self._check_graph_safe(loop)
            output = torch.cat([input_ids, loop.decode()], dim=1)
            self._decode_loops[batch] = loop  # kept: the next call of this shape reuses its buffers and graph
        self._end_run(start, input_ids, output, loop=loop.times)
        return output

    def generate_stepwise(
        self,
        generate: Callable[..., Any],
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """``generate(*args, **kwargs)`` (transformers' ``generate`` of this engine's model) step by step
        through a fresh cache of this engine, recorded for :meth:`stats`.

        What :meth:`generate` does for options its own loop does not run, and what ``omnikv run`` does
        for a script's ``model.generate``. ``prompt_ids`` ``[batch, prompt]`` and ``max_new_tokens``
        size the cache (beams as ``kwargs`` or the generation config ask); the config's prefill chunk
        size applies unless the call sets one.
        """
        self._check_attached()
        kwargs = dict(kwargs or {})
        batch, prompt = prompt_ids.shape
        config = kwargs.get("generation_config") or self.model.generation_config
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
        self._check_memory_releasing(batch * beams, prompt, max_new_tokens)
        cache = self.new_cache(reserve_tokens=reserve_tokens(prompt, max_new_tokens), prompt_tokens=prompt)
        if self.config.prefill.chunk_size:
            kwargs = with_generation_options(kwargs, defaults={"prefill_chunk_size": self.config.prefill.chunk_size})
        kwargs[self.cache_keyword] = cache
        self.transfer.reset_stats()
        timer = FirstDecodeTimer()
        start = time.perf_counter()
        with self.listening(timer):
            output = generate(*args, **kwargs)
        self._end_run(start, prompt_ids, output, first_decode=timer.time)
        return output

    def _end_run(self, start: float, prompt_ids: torch.Tensor, output: Any, **how: Any) -> None:
        """Wait for the host tier to hold every token, then record the run."""
        self.transfer.synchronize()
        sequences = getattr(output, "sequences", output)
        new = int(sequences.shape[1] - prompt_ids.shape[1]) if torch.is_tensor(sequences) else None
        batch, prompt = prompt_ids.shape
        self._last_run = RunRecord(start, time.perf_counter(), prompt, batch, new, **how)

    def graph_blocker(self) -> str | None:
        """Why decode steps cannot be captured in a CUDA graph here, or None when they can."""
        if self.device.type != "cuda":
            return "no CUDA device"
        if not self.config.generation.cuda_graphs:
            return "generation.cuda_graphs is false"
        if self.config.distributed.offload_weights:
            return "distributed.offload_weights: a CUDA graph cannot capture DeepSpeed's weight fetches"
        if not getattr(self.policy, "graph_safe", False):
            return f"the selection policy {type(self.policy).__name__} does not declare graph_safe"
        return None

    def _decode_loop(self, batch: int, prompt: int, max_new_tokens: int, sampling, stop) -> DecodeLoop:
        """The decode loop for this call: the kept one of the same shape (its cache emptied, its
        CUDA graph reused), or a new one over a new cache."""
        reserve = reserve_tokens(prompt, max_new_tokens)  # rounded up: nearby lengths share a captured step
        key = (prompt, reserve, sampling, tuple(stop.eos_token_ids), stop.pad_token_id)
        kept = self._decode_loops.get(batch)
        if kept is not None and kept.key == key:
            kept.cache.reset()
            kept.renew(max_new_tokens, stop)
            self._last_cache = kept.cache
            return kept
        self._decode_loops.pop(batch, None)  # its memory goes before the new cache's is taken
        self._check_memory_releasing(batch, prompt, max_new_tokens)
        cache = self.new_cache(reserve_tokens=reserve, prompt_tokens=prompt)
        blocker = self.graph_blocker()
        if blocker is not None and self.device.type == "cuda":
            logger.info("decode steps run without a CUDA graph: %s", blocker)
        loop = DecodeLoop(
            self.model,
            cache,
            self.cache_keyword,
            sampling,
            stop,
            max_new_tokens,
            use_graph=blocker is None,
            check_every=self.config.generation.check_every,
            token_capacity=reserve - prompt,
        )
        loop.key = key
        return loop

    def _check_graph_safe(self, loop: DecodeLoop) -> None:
        """After the prefill allocated the host tier: a tier the GPU cannot read alone rules the graph out."""
        unsafe = [a for a in loop.cache.tiers.arenas if a is not None and not self.transfer.graph_safe(a.data)]
        if loop.use_graph and unsafe:  # the torch engine over host memory, or pageable memory after a failed pin
            logger.info(
                "decode steps run without a CUDA graph: the %s transfer engine cannot move rows of a %s host tier "
                "without the host",
                self.transfer.name,
                "pinned" if unsafe[0].data.is_pinned() else "pageable (pinning failed)",
            )
            loop.run_eagerly()

    def release_graphs(self) -> None:
        """Free the decode loops (caches and CUDA graphs) kept for reuse by later calls."""
        self._decode_loops.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_memory_releasing(self, batch: int, prompt_tokens: int, new_tokens: int) -> None:
        """The memory check, after freeing kept decode loops if they are what stands in the way."""
        try:
            self.check_memory(batch, prompt_tokens, new_tokens)
        except PromptError:
            if not self._decode_loops:
                raise
            self.release_graphs()
            self.check_memory(batch, prompt_tokens, new_tokens)

    def check_memory(
        self,
        batch: int,
        prompt_tokens: int,
        new_tokens: int,
        reserved: tuple[int, int] = (0, 0),
        prefill_rows: int | None = None,
        prefill_tokens: int | None = None,
    ) -> None:
        """On CUDA, raise PromptError (naming what to change) when the memory planner says the run cannot fit
        (with ``reserved`` ``(GPU, host)`` bytes more, e.g. a server's prefix cache; ``prefill_rows``: rows
        prefilled together, default all of them; ``prefill_tokens``: prompt tokens in one forward, default one
        chunk)."""
        if self.device.type != "cuda":
            return
        from omnikv_runtime.planner.fit import check_run

        check_run(
            self.geometry,
            self.planner_config(),
            self.device,
            batch,
            prompt_tokens,
            new_tokens,
            reserved,
            prefill_rows,
            prefill_tokens,
        )

    def planner_config(self) -> OmniKVConfig:
        """The config as the memory planner must see it: a copy, with the dtype the weights are loaded in."""
        config = self.config.model_copy(deep=True)
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        if dtype in ("float32", "bfloat16", "float16"):
            config.model.dtype = dtype
        return config

    def stats(self) -> dict[str, Any]:
        """What the last generate did: tokens selected per filter layer and step, bytes moved, timings."""
        return run_stats(self)

    def memory_report(self) -> dict[str, Any]:
        """Bytes per KV tier of the last cache, GPU peak (CUDA only), host RSS, and weights."""
        return memory_report(self)

    def describe_layers(self) -> dict[str, list[int]]:
        """Layer indices by role."""
        return {role.value: [i for i, r in enumerate(self.plan.roles) if r is role] for role in Role}


def initialize(
    model: PreTrainedModel | str | Path | None = None,
    config: str | Path | dict[str, Any] | OmniKVConfig | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
) -> Engine:
    """Wrap `model` (or the config's model, loaded) with the OmniKV runtime.

    A model handed in wins over the config's ``model`` section; a name or path (``"smollm2-135m"``, an
    HF folder, a ``.gguf`` file) is loaded with the config's dtype and device. Omitted config fields
    take defaults. ``trust_remote_code``: see :func:`~omnikv_runtime.config.load_config`.
    """
    cfg = load_config(config, trust_remote_code=trust_remote_code)
    if model is None or isinstance(model, (str, Path)):
        from omnikv_runtime.models import load_configured_model

        deepspeed_places = cfg.distributed.tp_size > 1 or cfg.distributed.offload_weights
        device = "cpu" if deepspeed_places else None  # DeepSpeed places the shards or offloads the weights
        model, loaded_tokenizer = load_configured_model(cfg, None if model is None else str(model), device=device)
        tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
    return Engine(model, cfg, tokenizer=tokenizer)


@contextlib.contextmanager
def attach(
    model: PreTrainedModel | str | Path | None = None,
    config: str | Path | dict[str, Any] | OmniKVConfig | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
) -> Iterator[Engine]:
    """``with attach(model, config) as engine:`` an engine for the block (as :func:`~omnikv_runtime.engine.initialize`
    builds it); on leaving, ``engine.detach()`` gives the model back as it was."""
    engine = initialize(model, config, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    try:
        yield engine
    finally:
        engine.detach()
