"""The server's turns as plans that every rank runs in the same order.

A turn of the scheduler is a :class:`TurnPlan`: the slots whose request ended (``drop``), the requests that
take a slot and start their prefill (``admit``), and the prefill chunks that run (``prefill``: slots and
their tokens this turn, within the turn's token budget, in one forward where the model allows it); after
them, one decode step of every slot that is decoding. :class:`TurnRunner` runs a plan on a
:class:`~omnikv_runtime.serve.batch.SlotBatch`. On one process that is all there is.

Under tensor parallelism every rank holds its heads of every slot, and each forward runs collectives
(the sharded layers' all-reduces, the filter layers' score all-reduce) that every rank must enter in the
same order. What happens when depends on wall-clock events that only rank 0 sees (arrivals, cancellations),
and the tokens on its sampling. So rank 0 decides: its scheduler builds each plan and broadcasts it
before any rank runs the turn's forwards, and after each forward it chooses the tokens (the other ranks
never sample) and broadcasts them with the slots whose request finished. The other ranks run
:meth:`TurnRunner.follow`: receive a plan, run it on their own batch with rank 0's choices, until rank 0
sends the stop. Every rank thus joins, steps and frees the same slots between the same forwards.

Messages are int64 tensors on the batch's device (NCCL needs them on the GPU), each preceded by its length.
An idle scheduler sends an empty plan now and then, so that the other ranks' pending broadcast does not
reach the process group's timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from omnikv_runtime.serve.batch import PrefillJob, SlotBatch, whole_chunk
from omnikv_runtime.serve.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

_PLAN, _CHOICE, _STOP = 1, 2, 3


@dataclass
class TurnPlan:
    """One turn, as rank 0 decided it before its forwards.

    Attributes:
        drop: slots whose request ended early (cancelled): a prefill in progress is dropped, a decoding
            slot is freed. Runs first, so a slot dropped here may be admitted again in the same plan.
        admit: ``(slot, prompt ids)`` of the requests that take a slot; their prefill starts.
        prefill: ``(slot, tokens)`` of the prefill chunks that run this turn (after the admissions), oldest
            request first: each slot's next ``tokens`` prompt tokens.
        reuse: ``{slot: tokens}`` of admitted requests whose prompt starts with a prefix the prefix cache holds:
            its KV is copied into the slot and the prefill starts after it (a slot left out reuses nothing).
    """

    drop: list[int] = field(default_factory=list)
    admit: list[tuple[int, list[int]]] = field(default_factory=list)
    prefill: list[tuple[int, int]] = field(default_factory=list)
    reuse: dict[int, int] = field(default_factory=dict)

    def encode(self) -> list[int]:
        message = [_PLAN, len(self.prefill), *(value for chunk in self.prefill for value in chunk)]
        message += [len(self.drop), *self.drop, len(self.admit)]
        for row, ids in self.admit:
            message += [row, len(ids), *ids]
        message.append(len(self.reuse))
        for row, tokens in self.reuse.items():
            message += [row, tokens]
        return message

    @classmethod
    def decode(cls, message: list[int]) -> TurnPlan:
        if message[0] != _PLAN:
            raise RuntimeError(f"expected a turn plan from rank 0, got a message of kind {message[0]}")
        chunks = message[1]
        prefill = list(zip(message[2 : 2 + 2 * chunks : 2], message[3 : 2 + 2 * chunks : 2], strict=True))
        at = 2 + 2 * chunks
        dropped = message[at]
        drop = message[at + 1 : at + 1 + dropped]
        at += 1 + dropped
        admit = []
        for _ in range(message[at]):
            row, length = message[at + 1], message[at + 2]
            admit.append((row, message[at + 3 : at + 3 + length]))
            at += 2 + length
        pairs = message[at + 2 : at + 2 + 2 * message[at + 1]]
        reuse = dict(zip(pairs[::2], pairs[1::2], strict=True))
        return cls(drop, admit, prefill, reuse)


class Chooser(Protocol):
    """Rank 0's side of a turn: it chooses each token and hands it to its request."""

    def choose(self, logits: torch.Tensor, rows: list[int]) -> dict[int, int]:
        """The token of each slot of ``rows`` from its logits (``logits[i]`` are ``rows[i]``'s)."""
        ...

    def deliver(self, tokens: dict[int, int]) -> list[int]:
        """Hand each slot's token to its request; returns the slots whose request has finished."""
        ...


class RankStopped(Exception):
    """Rank 0 stopped (the server stopped, or its turn failed): the other ranks stop following."""


class PlanChannel:
    """Rank 0's messages to the other ranks of the tensor-parallel ``group`` (broadcasts)."""

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group, self.device = group, device
        self.rank = dist.get_rank(group)
        self.source = dist.get_global_rank(group, 0)

    def send(self, message: list[int]) -> None:
        payload = torch.tensor(message, dtype=torch.long, device=self.device)
        dist.broadcast(torch.tensor([payload.numel()], device=self.device), self.source, group=self.group)
        dist.broadcast(payload, self.source, group=self.group)

    def receive(self) -> list[int]:
        size = torch.zeros(1, dtype=torch.long, device=self.device)
        dist.broadcast(size, self.source, group=self.group)
        payload = torch.empty(int(size), dtype=torch.long, device=self.device)
        dist.broadcast(payload, self.source, group=self.group)
        message = payload.tolist()
        if message[0] == _STOP:
            raise RankStopped
        return message


class TurnRunner:
    """Runs turn plans on one rank's slot batch (see the module docstring).

    Args:
        batch: this rank's slot batch.
        chunk_size: prompt tokens of one request's prefill chunk at most.
        channel: with tensor parallelism, the channel to the other ranks; None on one process.
        prefixes: this rank's prefix cache (None: no prefix reuse): admissions copy the prefix the plan reuses
            from it, and each prompt's blocks are stored into it when its prefill ends.
    """

    def __init__(
        self, batch: SlotBatch, chunk_size: int, channel: PlanChannel | None = None, prefixes: PrefixCache | None = None
    ) -> None:
        self.batch, self.chunk_size, self.channel, self.prefixes = batch, chunk_size, channel, prefixes
        self.leader = channel is None or channel.rank == 0
        self.jobs: dict[int, PrefillJob] = {}  # slot -> its prefill in progress
        self.decoding: set[int] = set()
        self.turns_run = 0
        self.stopped = False

    def run(self, plan: TurnPlan | None, chooser: Chooser | None) -> None:
        """Run one turn: rank 0 passes its plan and chooser (the plan is sent first); the other ranks pass
        None and receive both (raises :class:`RankStopped` when rank 0 sends the stop instead)."""
        if self.leader:
            if self.channel is not None:
                self.channel.send(plan.encode())
        else:
            plan = TurnPlan.decode(self.channel.receive())
        self.turns_run += 1
        if self.prefixes is not None:
            self.prefixes.begin_turn()
        for row in plan.drop:
            self._end(row)
        for row, ids in plan.admit:
            self.jobs[row] = PrefillJob(self.batch, row, ids, self.chunk_size, self.prefixes, plan.reuse.get(row, 0))
        if plan.prefill:
            finished = self.batch.prefill([(self.jobs[row], tokens) for row, tokens in plan.prefill])
            if finished:  # their last chunks: each request's first token, then it decodes
                rows = list(finished)
                joining = [self.jobs.pop(row) for row in rows]
                self._settle(chooser, lambda: torch.stack([finished[row] for row in rows]), rows, joining)
        if self.decoding:
            rows = sorted(self.decoding)
            step = self.batch.step()
            self._settle(chooser, lambda: step[rows], rows)

    def plan_prefill(
        self,
        order: list[int],
        admit: list[tuple[int, list[int]]],
        budget: int,
        reuse: dict[int, int] | None = None,
    ) -> list[tuple[int, int]]:
        """Rank 0: the prefill chunks of a turn whose plan admits ``admit`` (``reuse``: the prompt tokens each
        admitted slot takes from the prefix cache), at most ``budget`` prompt tokens in all.

        The prefilling slots of ``order`` (oldest request first) each get their next chunk whole (to the end of
        its chunk, :func:`~omnikv_runtime.serve.batch.whole_chunk`) where it fits what is left of the budget; a
        chunk that does not fit waits for a later turn, and younger requests' chunks that fit go ahead of it.
        Only the turn's first chunk is ever cut to the budget (a budget under ``chunk_size``), so with the
        default budget every request is prefilled in the chunks ``Engine.generate`` would run it in."""
        reuse = reuse or {}
        # a slot admitted again after a drop starts anew, after the tokens it reuses
        starting = {row: (reuse.get(row, 0), len(ids) - reuse.get(row, 0)) for row, ids in admit}
        chunks: list[tuple[int, int]] = []
        for row in order:
            if budget <= 0:
                break
            job = self.jobs.get(row)
            done, remaining = starting[row] if row in starting else (job.done_tokens, job.remaining)
            tokens = whole_chunk(done, remaining, self.chunk_size)
            if tokens > budget:
                if chunks:
                    continue
                tokens = budget
            if tokens > 0:
                chunks.append((row, tokens))
                budget -= tokens
        return chunks

    def follow(self) -> int:
        """On a rank other than 0: run rank 0's turns until it stops; returns the turns run."""
        try:
            while True:
                self.run(None, None)
        except RankStopped:
            logger.info("rank %d: rank 0 stopped after %d turns", self.channel.rank, self.turns_run)
        self.reset()
        return self.turns_run

    def stop(self) -> None:
        """On rank 0: tell the other ranks to stop following (once)."""
        if self.leader and self.channel is not None and not self.stopped:
            self.channel.send([_STOP])
        self.stopped = True

    def reset(self) -> None:
        """Drop every prefill in progress and free every decoding slot (this rank only)."""
        self.jobs.clear()
        for row in sorted(self.decoding):
            self._end(row)

    def _settle(
        self,
        chooser: Chooser | None,
        logits: Callable[[], torch.Tensor],
        rows: list[int],
        joining: list[PrefillJob] | None = None,
    ) -> None:
        """After a forward: rank 0 chooses the tokens of ``rows`` from their ``logits()`` and says which requests
        finished; every rank then feeds the tokens to the next step (``joining``: the prefills whose slots start
        decoding) and frees the finished slots."""
        if self.leader:
            tokens = chooser.choose(logits(), rows)
            self._feed(tokens, joining)
            finished = chooser.deliver(tokens)
            if self.channel is not None:
                pairs = [value for row in rows for value in (row, tokens[row])]
                self.channel.send([_CHOICE, len(rows), *pairs, len(finished), *finished])
        else:
            message = self.channel.receive()
            if message[0] != _CHOICE:
                raise RuntimeError(f"expected rank 0's tokens, got a message of kind {message[0]}")
            count = message[1]
            tokens = dict(zip(message[2 : 2 + 2 * count : 2], message[3 : 3 + 2 * count : 2], strict=True))
            ended = message[2 + 2 * count]
            finished = message[3 + 2 * count : 3 + 2 * count + ended]
            self._feed(tokens, joining)
        for row in finished:
            self._end(row)

    def _feed(self, tokens: dict[int, int], joining: list[PrefillJob] | None) -> None:
        if joining is not None:
            for job in joining:
                self.batch.join(job, tokens[job.row])
                self.decoding.add(job.row)
                if self.prefixes is not None:
                    self.prefixes.store(job.cache, job.prompt_ids, job.row)
            return
        rows = torch.tensor(list(tokens), dtype=torch.long, device=self.batch.device)
        values = torch.tensor(list(tokens.values()), dtype=torch.long, device=self.batch.device)
        self.batch.ids[rows, 0] = values

    def _end(self, row: int) -> None:
        if self.jobs.pop(row, None) is None and row in self.decoding:
            self.decoding.discard(row)
            self.batch.leave(row)
