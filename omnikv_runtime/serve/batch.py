"""The server's running batch: a slot cache, its chunked prefills, and its static decode step.

:class:`SlotBatch` owns a :class:`~omnikv_runtime.cache.slots.SlotCache` and the step's fixed
inputs. A request enters through a :class:`PrefillJob` (its prompt in chunks, through a batch-1
view of its slot), then decodes with the others, one token per :meth:`SlotBatch.step`. On CUDA
the step runs through a :class:`~omnikv_runtime.decode.graph.GraphedStep` keyed by the batch's
layout (each slot's context and budget): a layout seen before replays its kept recording, a new
one is recorded after one eager step with it.
"""

from __future__ import annotations

import logging

import torch

from omnikv_runtime.cache.adapter import OmniKVCache
from omnikv_runtime.cache.slots import SlotCache
from omnikv_runtime.decode.graph import CudaGraphRecorder, EagerRecorder, GraphedStep
from omnikv_runtime.decode.loop import cached_forward
from omnikv_runtime.serve.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class PrefillJob:
    """One request's prompt, run chunk by chunk into its slot (:meth:`advance` runs one chunk).

    ``reused`` tokens at the prompt's start are already in the slot (copied from the server's prefix cache into
    :attr:`cache`): the prefill runs from there."""

    def __init__(
        self,
        batch: SlotBatch,
        row: int,
        prompt_ids: list[int],
        chunk_size: int,
        prefixes: PrefixCache | None = None,
        reused: int = 0,
    ) -> None:
        self.batch, self.row = batch, row
        self.prompt_ids = prompt_ids
        self.ids = torch.tensor([prompt_ids], dtype=torch.long, device=batch.device)
        self.chunk_size = chunk_size
        self.cache: OmniKVCache = batch.cache.row_cache(row, len(prompt_ids))
        if reused:
            prefixes.load(self.cache, prompt_ids, reused)
        self.done_tokens = self.reused = reused

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
        engine: the engine whose model and cache parts the batch uses.
        rows: slots.
        capacity: columns per slot (prompt and new tokens of a request, plus one scratch column).
        new_tokens: tokens a request generates at most (the tail ring's size).
        recorder: how steps are recorded (default: CUDA graphs where the engine allows them).
        max_graphs: recorded layouts kept at most.
    """

    def __init__(
        self,
        engine,
        rows: int,
        capacity: int,
        new_tokens: int,
        recorder: CudaGraphRecorder | EagerRecorder | None = None,
        max_graphs: int = 16,
    ) -> None:
        self.engine = engine
        self.model = engine.model
        self.cache_keyword = engine.cache_keyword
        self.device = engine.device
        self.cache = engine.new_slot_cache(rows, capacity, new_tokens)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.mask = torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=self.device)  # 4-D: transformers builds none
        self.cache_position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None  # [rows, vocab] float32, written by each step
        if recorder is None and self.device.type == "cuda" and engine.graph_blocker() is None:
            recorder = CudaGraphRecorder(self.device)
        self.use_graph = recorder is not None
        self.steps = GraphedStep(recorder, engine.transfer, warmup=1, max_graphs=max_graphs, name="batch step")
        self._generation = self.cache.tiers.generation
        self._view: SlotCache = self.cache  # eager steps: the slots up to the last busy one
        self._view_layout: tuple | None = None

    @property
    def rows(self) -> int:
        return self.cache.rows

    @property
    def captures(self) -> int:
        """Steps recorded so far (a layout seen before is replayed, not recorded again)."""
        return self.steps.times.recordings

    def join(self, job: PrefillJob, first_token: int) -> None:
        """Slot ``job.row`` decodes from now on, starting with ``first_token``."""
        self.cache.activate(job.row, job.cache)
        self.ids[job.row, 0] = first_token
        self.positions[job.row, 0] = job.prompt_tokens

    def leave(self, row: int) -> None:
        self.cache.release(row)

    def step(self) -> torch.Tensor:
        """One decode step of the slots; returns the logits ``[rows, vocab]`` (idle slots: meaningless).

        Eagerly (no recorder) the step computes the slots up to the last busy one only (requests take
        the lowest free slots). A recorded step computes every slot: that is the path measured on the
        GPU, where an idle slot costs little (it attends to one column and selects nothing).
        """
        layout = self.cache.layout()
        if not self.steps.enabled:
            if layout != self._view_layout:
                self._view, self._view_layout = self.cache.prefix(max(self.cache.busy_prefix(), 1)), layout
            self._run_step(self._view)
            return self.logits
        if self.cache.tiers.generation != self._generation:  # a buffer a recording reads was replaced
            self.steps.forget()
            self._generation = self.cache.tiers.generation
        self.steps.run((layout, self._generation), lambda: self._run_step(self.cache))
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
