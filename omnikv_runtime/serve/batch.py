"""The server's running batch: a slot cache, its chunked prefills, and its static decode step.

:class:`SlotBatch` owns a :class:`~omnikv_runtime.cache.slots.SlotCache` and the step's fixed
inputs. A request enters through a :class:`PrefillJob` (its prompt in chunks, through a batch-1
view of its slot), then decodes with the others, one token per :meth:`SlotBatch.step`.
:meth:`SlotBatch.prefill` runs the chunks of several requests in one forward, packed as one sequence
(:class:`~omnikv_runtime.cache.packed.PackedPrefill`), where the model allows it. On CUDA
the step runs through a :class:`~omnikv_runtime.decode.graph.GraphedStep` keyed by the batch's
layout (each slot's context and budget): a layout seen before replays its kept recording, a new
one is recorded after one eager step with it.
"""

from __future__ import annotations

import itertools
import logging

import torch

from omnikv_runtime.cache.adapter import OmniKVCache
from omnikv_runtime.cache.attention import base_implementation
from omnikv_runtime.cache.packed import PackedPrefill
from omnikv_runtime.cache.slots import SlotCache
from omnikv_runtime.decode.graph import CudaGraphRecorder, EagerRecorder, GraphedStep
from omnikv_runtime.decode.loop import cached_forward
from omnikv_runtime.serve.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

# families whose attention modules store KV through ``cache.update`` and then call the attention function,
# with the rotary embedding read from per-token position ids: chunks of several requests may be packed
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def packing_blocker(model: torch.nn.Module, batch_invariant: bool = False) -> str | None:
    """Why chunks of several requests cannot run packed in one forward of ``model``, or None (``batch_invariant``:
    ``generation.batch_invariant``, under which a chunk's projections must have the shape they have alone)."""
    if batch_invariant:
        return "generation.batch_invariant: each request's chunk runs alone, as generate runs it"
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in PACKABLE_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(PACKABLE_MODEL_TYPES)}"
    implementation = getattr(config, "_attn_implementation", None) or ""
    if not implementation.startswith("omnikv") or base_implementation(implementation) is None:
        return f"the model's attention implementation {implementation!r} is not the runtime's"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in ("dynamic", "longrope"):  # their frequencies depend on the longest position of the forward
        return f"its rotary embedding ({rope_type!r}) depends on the longest position in the forward"
    return None


def whole_chunk(done: int, remaining: int, chunk_size: int) -> int:
    """Prompt tokens from ``done`` to the end of its chunk, where chunks start at multiples of ``chunk_size`` from
    the prompt's first token (as ``Engine.generate`` cuts a prompt) and the last one ends with the prompt.

    Cut this way, a request's chunks do not depend on what else the server runs, nor does its prefill: its
    forwards see the same queries and keys as a prefill alone (a chunk cut elsewhere can round otherwise in
    bf16)."""
    return min(chunk_size - done % chunk_size, remaining)


class PrefillJob:
    """One request's prompt, run chunk by chunk into its slot from ``done_tokens`` on.

    :meth:`advance` runs its next chunk alone; :meth:`SlotBatch.prefill` runs chunks of several jobs in one
    forward. Either way a chunk starts at ``done_tokens`` (a job may start past 0, its earlier tokens
    already in its slot: the ``reused`` tokens at the prompt's start, which the server's prefix cache holds in the
    slot or copies into :attr:`cache`)."""

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
        if prefixes is not None:
            prefixes.load(self.cache, prompt_ids, reused, row)
        self.done_tokens = self.reused = reused

    @property
    def prompt_tokens(self) -> int:
        return self.ids.shape[1]

    @property
    def remaining(self) -> int:
        """Prompt tokens not prefilled yet."""
        return self.prompt_tokens - self.done_tokens

    def next_chunk(self, budget: int) -> int:
        """Tokens of the next chunk within ``budget``: up to the end of its chunk (:func:`whole_chunk`)."""
        return max(0, min(whole_chunk(self.done_tokens, self.remaining, self.chunk_size), budget))

    def chunk(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``tokens`` prompt ids and their positions, ``[tokens]`` each (refused past the prompt)."""
        start = self.done_tokens
        if not 0 < tokens <= self.remaining:
            raise ValueError(f"slot {self.row}: a chunk of {tokens} tokens, with {self.remaining} prompt tokens left")
        return self.ids[0, start : start + tokens], torch.arange(start, start + tokens, device=self.ids.device)

    def ran(self, tokens: int) -> bool:
        """``tokens`` more prompt tokens are in the slot; True once the whole prompt is."""
        self.done_tokens += tokens
        return self.done_tokens == self.prompt_tokens

    def advance(self, tokens: int | None = None) -> torch.Tensor | None:
        """Run the next chunk (``tokens``, default to the end of its chunk) alone; after the last one,
        the logits ``[vocab]`` of the prompt's last token."""
        ids, columns = self.chunk(self.next_chunk(self.chunk_size) if tokens is None else tokens)
        mask = torch.ones(1, int(columns[-1]) + 1, dtype=torch.long, device=self.ids.device)
        batch = self.batch
        output = cached_forward(batch.model, self.cache, batch.cache_keyword, ids[None], columns[None], mask, columns)
        return output.logits[0, -1].float() if self.ran(ids.numel()) else None


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
        self.packing_blocker = packing_blocker(self.model, engine.config.generation.batch_invariant)
        if self.packing_blocker is not None:
            logger.info("prefill: chunks of several requests run one forward each (%s)", self.packing_blocker)
        self._packed_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)  # transformers builds none
        self.prefill_tokens = 0  # prompt tokens prefilled by prefill()
        self.prefill_forwards = 0  # the forwards that ran them

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

    def prefill(self, chunks: list[tuple[PrefillJob, int]]) -> dict[int, torch.Tensor]:
        """Run the next ``tokens`` of each job's prompt (``(job, tokens)`` pairs, distinct slots): several
        chunks in one packed forward where the model allows it, else one forward each. Returns, by slot, the
        logits ``[vocab]`` of each prompt's last token, for the jobs whose prompt is now complete."""
        self.prefill_tokens += sum(tokens for _, tokens in chunks)
        if len(chunks) == 1 or self.packing_blocker is not None:
            finished = {}
            for job, tokens in chunks:
                logits = job.advance(tokens)
                self.prefill_forwards += 1
                if logits is not None:
                    finished[job.row] = logits
            return finished
        parts = [job.chunk(tokens) for job, tokens in chunks]
        ids = torch.cat([part[0] for part in parts])[None]
        positions = torch.cat([part[1] for part in parts])[None]
        lasts = torch.tensor(list(itertools.accumulate(tokens for _, tokens in chunks)), device=self.device) - 1
        packed = PackedPrefill(
            [(job.cache, tokens) for job, tokens in chunks], self.cache.fused_layers, self.cache.listeners
        )
        output = cached_forward(
            self.model, packed, self.cache_keyword, ids, positions, self._packed_mask, positions[0], lasts
        )
        packed.check_attended()
        self.prefill_forwards += 1
        logits = output.logits[0]
        return {job.row: logits[index].float() for index, (job, tokens) in enumerate(chunks) if job.ran(tokens)}

    def step(self) -> torch.Tensor:
        """One decode step of the slots; returns the logits ``[rows, vocab]`` (idle slots: meaningless).

        Eagerly (no recorder) the step computes the slots up to the last busy one only (requests take
        the lowest free slots). A recorded step computes every slot: that is the path measured on the
        GPU, where an idle slot costs little (it attends to one column, and its padded selection fetches nothing).
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
