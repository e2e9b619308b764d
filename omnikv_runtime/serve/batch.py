"""The server's running batch: a slot cache, its chunked prefills, and its static decode step.

:class:`SlotBatch` owns a :class:`~omnikv_runtime.cache.slots.SlotCache` and the step's fixed
inputs. A request enters through a :class:`PrefillJob` (its prompt in chunks, through a batch-1
view of its slot), then decodes with the others, one token per :meth:`SlotBatch.step`. On CUDA
the step is recorded in a CUDA graph and replayed; the recording is redone when the batch's
layout changes (a request joined or left), after one eager step with the new layout.
"""

from __future__ import annotations

import logging
import time

import torch

from omnikv_runtime.cache.adapter import OmniKVCache
from omnikv_runtime.cache.slots import SlotCache
from omnikv_runtime.decode.loop import cached_forward, record_step, run_on_stream

logger = logging.getLogger(__name__)


class PrefillJob:
    """One request's prompt, run chunk by chunk into its slot (:meth:`advance` runs one chunk)."""

    def __init__(self, batch: SlotBatch, row: int, prompt_ids: list[int], chunk_size: int) -> None:
        self.batch, self.row = batch, row
        self.ids = torch.tensor([prompt_ids], dtype=torch.long, device=batch.device)
        self.chunk_size = chunk_size
        self.done_tokens = 0
        self.cache: OmniKVCache = batch.cache.row_cache(row, len(prompt_ids))

    @property
    def prompt_tokens(self) -> int:
        return self.ids.shape[1]

    def advance(self) -> torch.Tensor | None:
        """Run the next chunk; after the last one, the logits ``[vocab]`` of the prompt's last token."""
        start, total = self.done_tokens, self.prompt_tokens
        end = min(start + self.chunk_size, total)
        columns = torch.arange(start, end, device=self.ids.device)
        mask = torch.ones(1, end, dtype=torch.long, device=self.ids.device)
        batch = self.batch
        output = cached_forward(
            batch.model, self.cache, batch.cache_keyword, self.ids[:, start:end], columns[None], mask, columns
        )
        self.done_tokens = end
        return output.logits[0, -1].float() if end == total else None


class SlotBatch:
    """The decode batch of a server (see the module docstring).

    Args:
        engine: the engine whose model, plan, policy and transfer engine the batch uses.
        rows: slots.
        capacity: columns per slot (prompt and new tokens of a request, plus one scratch column).
        new_tokens: tokens a request generates at most (the tail ring's size).
    """

    def __init__(self, engine, rows: int, capacity: int, new_tokens: int) -> None:
        self.engine = engine
        self.model = engine.model
        self.cache_keyword = engine.cache_keyword
        self.device = engine.device
        text = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        config = engine.config.omnikv
        self.cache = SlotCache(
            engine.plan,
            engine.policy,
            config.budget_tokens,
            engine.transfer,
            rows,
            capacity,
            new_tokens,
            text.num_key_value_heads,
            head_dim,
            dtype,
            self.device,
            tail_tokens=config.tail_tokens,
        )
        self.cache.fused_layers = engine.fused_layers
        self.cache.rope_inv_freq = engine.rope_inv_freq
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.mask = torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=self.device)  # 4-D: transformers builds none
        self.cache_position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None  # [rows, vocab] float32, written by each step
        self.use_graph = self.device.type == "cuda" and engine.graph_blocker() is None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_layout: tuple | None = None
        self._eager_with_layout = 0
        self._stream = torch.cuda.Stream(self.device) if self.use_graph else None
        self._step_transfer = None  # what one replayed step moves (measured while recording)
        self.captures = 0
        self._view: SlotCache = self.cache  # eager steps: the slots up to the last busy one
        self._view_layout: tuple | None = None

    @property
    def rows(self) -> int:
        return self.cache.rows

    def join(self, job: PrefillJob, first_token: int) -> None:
        """Slot ``job.row`` decodes from now on, starting with ``first_token``."""
        self.cache.activate(job.row, job.cache)
        self.ids[job.row, 0] = first_token
        self.positions[job.row, 0] = job.prompt_tokens

    def leave(self, row: int) -> None:
        self.cache.release(row)

    def step(self) -> torch.Tensor:
        """One decode step of the slots; returns the logits ``[rows, vocab]`` (idle slots: meaningless).

        Eagerly (no CUDA graph) the step computes the slots up to the last busy one only (requests
        take the lowest free slots). A recorded step computes every slot: that is the path measured
        on the GPU, where an idle slot costs little (it attends to one column and selects nothing).
        """
        layout = self.cache.layout()
        if not self.use_graph:
            if layout != self._view_layout:
                self._view, self._view_layout = self.cache.prefix(self.cache.busy_prefix()), layout
            self._run_step(self._view)
            return self.logits
        if layout != self._graph_layout:
            self._graph, self._graph_layout, self._eager_with_layout = None, layout, 0
        if self._graph is None and self._eager_with_layout < 1:  # a real step first: kernels compiled, buffers sized
            self._eager_with_layout += 1
            run_on_stream(self._stream, lambda: self._run_step(self.cache))
            return self.logits
        if self._graph is None:
            self._capture()
        self._graph.replay()
        self.cache.transfer.stats.add_(self._step_transfer)
        return self.logits

    def _run_step(self, cache: SlotCache) -> None:
        """The model's step over the first ``cache.rows`` slots (``cache`` is the slot cache or a prefix of it)."""
        rows = cache.rows
        ids, positions, mask = self.ids[:rows], self.positions[:rows], self.mask[:rows]
        output = cached_forward(self.model, cache, self.cache_keyword, ids, positions, mask, self.cache_position)
        last = output.logits[:, -1]
        if self.logits is None:
            self.logits = torch.empty(self.rows, last.shape[-1], dtype=torch.float32, device=last.device)
        self.logits[:rows].copy_(last)
        positions.add_(1)

    def _capture(self) -> None:
        started = time.perf_counter()
        self._graph = None
        self._graph, self._step_transfer = record_step(self.cache, self._stream, lambda: self._run_step(self.cache))
        self.captures += 1
        logger.debug("batch step recorded in a CUDA graph in %.0f ms", (time.perf_counter() - started) * 1e3)
