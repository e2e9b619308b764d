"""The engine: wraps a transformers causal LM with the OmniKV attention function and tiered cache."""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from omnikv_runtime.attention import BASE_MASK_FUNCTIONS, register_attention
from omnikv_runtime.cache import OmniKVCache
from omnikv_runtime.config import OmniKVConfig, load_config
from omnikv_runtime.decode_loop import DecodeLoop, loop_settings
from omnikv_runtime.distributed import tensor_parallel, tensor_parallel_group
from omnikv_runtime.engine_guards import ExclusiveUse, mark_prefill_forwards
from omnikv_runtime.errors import ConfigError, PromptError, UnsupportedModelError
from omnikv_runtime.fused_layers import install_fused_layers
from omnikv_runtime.generate_args import check_generate_call, with_generation_options
from omnikv_runtime.kernels.triton_support import TRITON_AVAILABLE
from omnikv_runtime.layout import LayerPlan, Role, reserve_tokens
from omnikv_runtime.policies import make_eviction_policy, make_selection_policy
from omnikv_runtime.transfer import make_transfer_engine

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model: PreTrainedModel) -> None:
    """Raise UnsupportedModelError unless `model` is a decoder-only LM of a family we support."""
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(
            f"expected a transformers model (AutoModelForCausalLM.from_pretrained(...)), got {type(model).__name__}; "
            "to load one by name or path, pass it as initialize(model='smollm2-135m') or in the config's model section"
        )
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type '{model_type}' ({type(model).__name__}) is not supported: omnikv_runtime runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} decoder-only models (attention through transformers' "
            "AttentionInterface and a Cache). Load one of those, or run this model without the runtime."
        )
    if not hasattr(model, "generate"):
        raise UnsupportedModelError(f"{type(model).__name__} has no generate(); load it with AutoModelForCausalLM")
    text_config = model.config.get_text_config(decoder=True)
    layer_types = getattr(text_config, "layer_types", None) or []
    sliding = "sliding_attention" in layer_types or (model_type == "mistral" and text_config.sliding_window)
    if sliding:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses sliding-window attention, which omnikv_runtime does not run (its "
            "decode step attends to the whole context). Set config.sliding_window = None (exact while the "
            "context fits the window), or run this model without the runtime."
        )


def _cache_keyword(model: PreTrainedModel) -> str:
    """``cache`` on transformers that renamed ``past_key_values`` (5.2x), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Engine:
    """OmniKV generation for one model. Build it with :func:`initialize`."""

    def __init__(
        self, model: PreTrainedModel, config: OmniKVConfig, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        check_supported(model)
        text_config = model.config.get_text_config(decoder=True)
        self.num_layers = text_config.num_hidden_layers
        config.check_for_model(self.num_layers)
        model = tensor_parallel(model, config)  # itself unless distributed.tp_size > 1
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
        self.hot_cache_tokens = config.offload.hot_cache_tokens if config.offload.device == "cpu" else 0
        if config.offload.hot_cache_tokens and not self.hot_cache_tokens:
            logger.info("offload.hot_cache_tokens is ignored with offload.device='none': every row is on the GPU")
        model.set_attn_implementation(register_attention(self._base_attention(model, config)))
        self.device = next(model.parameters()).device
        self.fused_layers = self._fuse_layers(model, config.generation.fused_layers)
        offload = config.offload
        self.transfer = make_transfer_engine(
            self.device, offload.device, offload.pin_memory, offload.transfer, offload.host_dtype
        )
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self._cache_keyword = _cache_keyword(model)
        self._last_cache: OmniKVCache | None = None
        self._last_run: dict[str, Any] = {}
        self._last_loop = None  # the decode loop's phase times of the last generate, if it ran
        self._decode_loops: dict[int, DecodeLoop] = {}  # batch size -> a loop with a captured step, kept
        self._exclusive = ExclusiveUse()  # generate calls from several threads run one at a time
        mark_prefill_forwards(model)  # model.generate with a cache from new_cache() tells prefill from decode
        if config.model.max_context_len:  # refuse at initialize what can never fit (CUDA)
            self.check_memory(1, config.model.max_context_len, 1)
        logger.info(
            "OmniKV plan for %d layers: %s (D dense, F filter, W wait, s sparse)", self.num_layers, self.plan.describe()
        )

    @staticmethod
    def _base_attention(model: PreTrainedModel, config: OmniKVConfig) -> str:
        """The model's own attention implementation (unwrapping an earlier ``omnikv``), else the config's."""
        current = getattr(model.config, "_attn_implementation", None) or ""
        if current.startswith("omnikv"):
            current = current.removeprefix("omnikv").removeprefix("_") or "sdpa"
        if current not in BASE_MASK_FUNCTIONS:
            return config.model.attn_implementation
        asked = config.model.attn_implementation
        if "attn_implementation" in config.model.model_fields_set and asked != current:
            logger.warning(
                "the model was loaded with attn_implementation=%r; the config's %r is ignored "
                "(a model handed to initialize wins; load it with the implementation you want)",
                current,
                asked,
            )
        return current

    def _fuse_layers(self, model: PreTrainedModel, wanted: bool | str) -> bool:
        """Install the fused decoder-layer forward where ``generation.fused_layers`` asks for it."""
        if wanted is False or (wanted == "auto" and not (self.device.type == "cuda" and TRITON_AVAILABLE)):
            return False
        fused = install_fused_layers(model)
        if fused == 0:
            logger.log(
                logging.WARNING if wanted is True else logging.INFO,
                "generation.fused_layers: no decoder layer of %s can be fused; transformers' layers run",
                type(model).__name__,
            )
        return fused > 0

    def new_cache(self, reserve_tokens: int = 0, prompt_tokens: int = 0) -> OmniKVCache:
        """A fresh tiered cache; also usable as ``model.generate(..., past_key_values=cache)``.

        ``reserve_tokens`` sizes the buffers up front (prompt + new tokens). ``prompt_tokens`` (the
        padded prompt length) keeps a chunked prefill whose last chunk is one token from being
        mistaken for a decode step; ``model.generate`` tells the cache by itself (the engine hooks
        its input preparation), so it is needed only when driving the model's forward by hand.
        """
        budget = self.config.omnikv.budget_tokens
        cache = OmniKVCache(
            self.plan,
            self.policy,
            budget,
            self.transfer,
            reserve_tokens=reserve_tokens,
            prompt_tokens=prompt_tokens,
            hot_cache_tokens=self.hot_cache_tokens,
            eviction=self.eviction,
            tail_tokens=self.config.omnikv.tail_tokens,
        )
        cache.fused_layers = self.fused_layers
        cache.tensor_parallel_group = self.tensor_parallel_group
        self._last_cache = cache
        return cache

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
        beams = generate_kwargs.get("num_beams") or 1
        batch, prompt = input_ids.shape
        self.transfer.reset_stats()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            if isinstance(settings, str):
                logger.info("generate runs step by step through transformers' generate: %s", settings)
                self._check_memory_releasing(batch * beams, prompt, max_new_tokens)
                cache = self.new_cache(reserve_tokens=reserve_tokens(prompt, max_new_tokens), prompt_tokens=prompt)
                output = self._transformers_generate(cache, input_ids, attention_mask, max_new_tokens, generate_kwargs)
                self._last_loop = None
            else:
                loop = self._decode_loop(batch, prompt, max_new_tokens, *settings)
                loop.prefill(input_ids, attention_mask, self.config.prefill.chunk_size)
                self._check_graph_safe(loop)
                output = torch.cat([input_ids, loop.decode()], dim=1)
                self._last_loop = loop.times
                self._decode_loops[batch] = loop  # kept: the next call of this shape reuses its buffers and graph
        self.transfer.synchronize()  # the host tier holds every token when generate returns
        end = time.perf_counter()
        self._last_run = {"start": start, "end": end, "prompt_tokens": input_ids.shape[1], "batch": input_ids.shape[0]}
        self._last_run["new_tokens"] = getattr(output, "sequences", output).shape[1] - input_ids.shape[1]
        return output

    def _transformers_generate(self, cache, input_ids, attention_mask, max_new_tokens, kwargs) -> Any:
        chunk = {"prefill_chunk_size": self.config.prefill.chunk_size} if self.config.prefill.chunk_size else {}
        kwargs = with_generation_options(kwargs, {"max_new_tokens": max_new_tokens}, chunk)
        kwargs[self._cache_keyword] = cache
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def graph_blocker(self) -> str | None:
        """Why decode steps cannot be captured in a CUDA graph here, or None when they can."""
        if self.device.type != "cuda":
            return "no CUDA device"
        if not self.config.generation.cuda_graphs:
            return "generation.cuda_graphs is false"
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
            self._cache_keyword,
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
        unsafe = [a for a in loop.cache.arenas if a is not None and not self.transfer.graph_safe(a.data)]
        if loop.use_graph and unsafe:  # the torch engine over host memory, or pageable memory after a failed pin
            logger.info(
                "decode steps run without a CUDA graph: the %s transfer engine cannot move rows of a %s host tier "
                "without the host",
                self.transfer.name,
                "pinned" if unsafe[0].data.is_pinned() else "pageable (pinning failed)",
            )
            loop.use_graph = loop.times.graph = False

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

    def check_memory(self, batch: int, prompt_tokens: int, new_tokens: int) -> None:
        """On CUDA, raise PromptError (naming what to change) when the memory planner says the run cannot fit."""
        if self.device.type != "cuda":
            return
        from omnikv_runtime.planner import ModelGeometry
        from omnikv_runtime.planner_fit import check_run

        config = self.config.model_copy(deep=True)
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        if dtype in ("float32", "bfloat16", "float16"):
            config.model.dtype = dtype
        geometry = ModelGeometry.from_hf_config(self.model.config.get_text_config(decoder=True))
        check_run(geometry, config, self.device, batch, prompt_tokens, new_tokens)

    def stats(self) -> dict[str, Any]:
        """What the last generate did: tokens selected per filter layer and step, bytes moved, timings."""
        cache = self._last_cache
        run = self._last_run
        out: dict[str, Any] = {
            "plan": self.plan.describe(),
            "filter_layers": [s.filter_layer for s in self.plan.segments],
            "sparse_layers": self.plan.sparse_layers,
            "transfer": self.transfer.stats.as_dict(),
        }
        if cache is None:
            return out
        if cache.hot_cache_tokens:
            hot = cache.hot_counters()
            out["transfer"]["bytes_fetched"] += hot.pop("hot_bytes_fetched")
            out["transfer"].update(hot)
        steps = cache.selected_log
        out["selected_per_step"] = {
            str(s.filter_layer): [step.get(s.filter_layer, 0) for step in steps] for s in self.plan.segments
        }
        out["context_tokens"] = cache.context_len
        dropped = cache.policy.dropped_tokens(cache.policy_states())
        out["dropped_tokens"] = {str(layer): n for layer, n in dropped.items()}
        out["decode_steps"] = len(steps)
        if run:
            first_decode = next((t for t, decoding in cache.forward_starts if decoding), run["end"])
            out.update(
                prompt_tokens=run["prompt_tokens"],
                batch=run["batch"],
                new_tokens=run["new_tokens"],
                prefill_seconds=first_decode - run["start"],
                decode_seconds=run["end"] - first_decode,
            )
            loop = self._last_loop
            if loop is not None:
                out.update(
                    prefill_seconds=loop.prefill,
                    decode_seconds=loop.decode,
                    graph_capture_seconds=loop.capture,
                    cuda_graph=loop.graph,
                )
        return out

    def memory_report(self) -> dict[str, Any]:
        """Bytes per KV tier of the last cache, GPU peak (CUDA only), host RSS, and weights."""
        tiers = self._last_cache.tier_bytes() if self._last_cache is not None else {}
        cuda = self.device.type == "cuda"
        return {
            "tiers": tiers,
            "host_tier_device": str(self.transfer.host_device),
            "compute_device": str(self.device),
            "weights_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "gpu_peak_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else None,
            "host_rss_bytes": psutil.Process().memory_info().rss,
        }

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
        from omnikv_runtime.models import load_model

        model, loaded_tokenizer = load_model(
            cfg.model.name_or_path if model is None else str(model),
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
            device="cpu" if cfg.distributed.tp_size > 1 else cfg.model.device,  # DeepSpeed places the shards
            quantization=cfg.model.quantization,
        )
        tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
    return Engine(model, cfg, tokenizer=tokenizer)
