"""Shared helpers of the test suite: tiny random models, prompts, dense references, attention spies.

Everything here is deterministic: a model of a family built with the same seed has the same
weights, so a dense reference can be computed on a fresh instance that the runtime never touched.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_utils import AttentionInterface

from omnikv_runtime.cache.adapter import _NOTES
from omnikv_runtime.engine import cache_keyword  # noqa: F401 - the tests' name for it
from omnikv_runtime.layout import Role
from omnikv_runtime.listeners import CacheRecorder, SelectionRecorder
from omnikv_runtime.models.random import SMALL_LLAMA, TINY_LLAMA

VOCAB = TINY_LLAMA["vocab_size"]
PAD = 0
PROMPT_LEN = 40
PAD_TOKENS = 7  # left padding of the second row in batch-2 prompts
NEW_TOKENS = 32
NUM_LAYERS = TINY_LLAMA["num_hidden_layers"]
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# filter layers 1 and 4, one wait layer each: D F W s F W s s
FILTER_LAYERS = [1, 4]
SPARSE_LAYERS = [3, 6, 7]
PLAN = "DFWsFWss"

_COMMON = dict(
    {key: value for key, value in TINY_LLAMA.items() if key != "model_type"},
    bos_token_id=None,
    eos_token_id=None,  # no early stop: every run produces exactly the tokens asked for
    pad_token_id=PAD,
    initializer_range=0.2,  # HF's 0.02 gives near-constant greedy output; 0.2 makes tokens depend on context
)

_FAMILY_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),  # head_dim != hidden / heads on purpose
}


def make_model(family: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any):
    """A fresh tiny random float32 model of `family` in eval mode; same seed -> same weights."""
    config_cls, model_cls, extra = _FAMILY_CLASSES[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if attn_implementation != "sdpa":
        model.set_attn_implementation(attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    return model


def cuda_llama(**overrides: Any):
    """A random float32 Llama of 8 layers (8 heads, 2 KV heads, vocabulary 512) on CUDA, seed 0."""
    torch.manual_seed(0)
    geometry = {key: value for key, value in SMALL_LLAMA.items() if key != "model_type"}
    config = LlamaConfig(vocab_size=512, num_hidden_layers=8, max_position_embeddings=4096, **geometry, **overrides)
    return LlamaForCausalLM(config).to("cuda", torch.float32).eval()


def cuda_prompt(batch: int, length: int, pad: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids for `cuda_llama` (vocabulary 512) and a mask on CUDA; row 1 (if any) left-padded by `pad`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    return ids.cuda(), mask.cuda()


def make_prompt(batch: int = 1, length: int = PROMPT_LEN, pad: int = PAD_TOKENS, seed: int = 1):
    """Random ids (never the pad id) and an attention mask; row 1 (if any) is left-padded by `pad` tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0
    ids[mask == 0] = PAD
    return ids, mask


def omni(budget: int | float = 1.0, selector: Any = None, **sections: Any) -> dict[str, Any]:
    """A config dict for the tiny models (filter layers 1 and 4, one wait layer)."""
    section: dict[str, Any] = {"filter_layers": list(FILTER_LAYERS), "wait_layers": 1, "token_budget": budget}
    if selector is not None:
        section["selector"] = selector
    return {"omnikv": section, **sections}


def greedy_generate(model, ids, mask, new_tokens: int = NEW_TOKENS, **kwargs):
    """transformers' greedy ``generate`` (its default DynamicCache unless ``kwargs`` pass a cache)."""
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, **kwargs
        )


@functools.cache
def dense_reference(
    family: str,
    batch: int,
    new_tokens: int = NEW_TOKENS,
    length: int = PROMPT_LEN,
    pad: int = PAD_TOKENS,
    attn_implementation: str = "sdpa",
) -> torch.Tensor:
    """Dense greedy output of a fresh, never-initialized model; cached (do not modify the result)."""
    model = make_model(family, attn_implementation=attn_implementation)
    ids, mask = make_prompt(batch, length, pad)
    out = greedy_generate(model, ids, mask, new_tokens)
    assert out.shape == (batch, length + new_tokens)
    return out


def dense_cache(family: str, ids, mask, new_tokens: int, **kwargs):
    """The DynamicCache a dense greedy generate of `new_tokens` tokens leaves (prompt + new - 1 tokens)."""
    out = greedy_generate(make_model(family), ids, mask, new_tokens, return_dict_in_generate=True, **kwargs)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    return out.sequences, cache


def arena_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All stored tokens of sparse `layer` from its segment's host arena, as ``[batch, kv_heads, n, head_dim]``."""
    segment = cache.plan.segment_of[layer]
    slot = cache.plan.segments[segment].sparse_layers.index(layer)
    arena = cache.tiers.arenas[segment]
    length = arena.lengths[slot]
    rows = arena.data[:, :length, slot]
    return rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2)


def arena_rows_at(cache, layer: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Arena rows of sparse `layer` at per-row token `indices` ``[batch, k]``."""
    keys, values = arena_kv(cache, layer)
    index = indices[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
    return torch.gather(keys, 2, index), torch.gather(values, 2, index)


@dataclass(frozen=True)
class AttentionCall:
    layer: int
    keys: int  # key.shape[2] (what the cache's update returned)
    queries: int  # query.shape[2]
    # columns the call attends to: key.shape[2] (with a sparse layer's earlier tokens in the host tier during
    # prefill), or in a decode step the spans of its KV sources
    attended: int


def current_note(layer: int, keys: torch.Tensor):
    """The attention note that ``cache.update`` left for this call, without taking it (None: no OmniKV cache)."""
    note = getattr(_NOTES, "note", None)
    if note is None or note.layer_idx != layer or note.keys is not keys:
        return None
    return note


def source_span(source) -> int:
    """Columns a decode KV source offers before its padding mask: its rows, or the first ``length`` of them."""
    columns = source.index.shape[1] if source.index is not None else source.keys.shape[1]
    return columns if source.length is None else min(columns, int(source.length.max()))


def source_kv(source) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode KV source's first ``source_span`` columns: head-major ``[batch, kv_heads, n, head_dim]`` keys
    and values (copies) and the ``[batch, n]`` bool mask of the columns that count."""
    n = source_span(source)
    keys, values = source.keys, source.values  # [batch, tokens, kv_heads, head_dim] views
    if source.index is not None:
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
        keys, values = keys[rows, source.index[:, :n]], values[rows, source.index[:, :n]]
    keys, values = keys[:, :n].transpose(1, 2).clone(), values[:, :n].transpose(1, 2).clone()
    mask = torch.ones(keys.shape[0], n, dtype=torch.bool, device=keys.device)
    if source.mask is not None:
        mask = mask & source.mask[:, :n].bool()
    return keys, values, mask


def reference_attention(query, keys, values, mask, scaling: float) -> torch.Tensor:
    """Float64 softmax attention of ``query`` ``[batch, q_heads, q, dim]`` over head-major ``keys``/``values``
    (KV head ``h // group`` serves query head ``h``) where ``mask`` ``[batch, n]`` (or ``[batch, 1, q, n]``) is True.

    Returns ``[batch, q, q_heads, dim]``, the layout attention functions return."""
    group = query.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    logits = (query.double() @ keys.transpose(2, 3)) * scaling
    logits = logits.masked_fill(~(mask[:, None, None, :] if mask.dim() == 2 else mask), float("-inf"))
    return (torch.softmax(logits, dim=-1) @ values).transpose(1, 2)


@contextmanager
def spy_attention(name: str = "omnikv", hook=None, after=None):
    """Wrap the registered attention function `name`; yields the list of AttentionCall it records.

    `hook(module, query, key, value, attention_mask)` runs before the wrapped function (the cache's
    attention note is still in place then: see :func:`current_note`), `after(module, query, output)`
    after it. The original function is registered again on exit. Install it after ``okv.initialize``
    (which registers).
    """
    original = AttentionInterface._global_mapping[name]
    calls: list[AttentionCall] = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        note = current_note(module.layer_idx, key)
        if note is not None and note.sources is not None:
            attended = sum(source_span(source) for source in note.sources)
        else:
            attended = key.shape[2] + (note.earlier.tokens if note is not None and note.earlier is not None else 0)
        calls.append(AttentionCall(module.layer_idx, key.shape[2], query.shape[2], attended))
        if hook is not None:
            hook(module, query, key, value, attention_mask)
        result = original(module, query, key, value, attention_mask, *args, **kwargs)
        if after is not None:
            after(module, query, result[0])
        return result

    AttentionInterface.register(name, spy)
    try:
        yield calls
    finally:
        AttentionInterface.register(name, original)


def split_forwards(calls: list[AttentionCall]) -> list[list[AttentionCall]]:
    """Group attention calls into model forwards (each forward starts at layer 0)."""
    forwards: list[list[AttentionCall]] = []
    for call in calls:
        if call.layer == 0 or not forwards:
            forwards.append([])
        forwards[-1].append(call)
    return forwards


def capture_caches(engine) -> list:
    """The list of caches `engine`'s forwards run through from now on (Engine.generate builds its own)."""
    recorder = CacheRecorder()
    engine.add_listener(recorder)
    return recorder.caches


def record_selections(engine) -> list:
    """The list of `engine`'s selection events from now on (a Selection each, its tensors copied)."""
    recorder = SelectionRecorder()
    engine.add_listener(recorder)
    return recorder.records


def is_sparse(engine, layer: int) -> bool:
    return engine.plan.role(layer) is Role.SPARSE


def run_in_triton_interpreter(check: str) -> None:
    """Run the Python source ``check`` in a child process under ``TRITON_INTERPRET=1`` (Triton kernels on CPU
    tensors; the interpreter must be chosen before triton is imported); it must print ``ok`` last."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    isolated = ["-P"] if sys.version_info >= (3, 11) else []  # import the installed package, not the cwd
    done = subprocess.run(
        [sys.executable, *isolated, "-c", check], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
