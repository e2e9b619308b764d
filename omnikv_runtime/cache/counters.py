"""Where a decode step is, kept on the device so that a CUDA graph can replay the step.

A captured step cannot read a Python integer that changes from step to step: the value would be
baked into the graph. So the column a step writes, the attended length, the tail ring's slot and
fill, and the selectable context are int64 ``[batch]`` tensors that the step itself advances
(:meth:`DecodeCounters.advance`, a handful of tiny kernels per step, not per layer). Each batch row
has its own: in a batch from one ``generate`` call they are equal (padding keeps the rows aligned),
while a server's rows are independent requests that joined at different times.

The **tail ring** holds, per sparse layer, the KV of the tokens generated since the last prefill;
sparse layers always attend to it. It has ``ring`` slots; token ``g`` (0-based) of the generation
goes to slot ``g % ring``. When more than ``ring`` tokens have been generated, the oldest ones
leave the ring and join the selectable context (every token is in the host tier, so the filter
layers may select it like a prompt token). With ``ring`` at least the number of generated tokens
(the default), nothing ever leaves it, as in the original OmniKV.
"""

from __future__ import annotations

import torch


class DecodeCounters:
    """int64 ``[batch]`` device tensors describing the current decode step of each batch row.

    Attributes:
        prompt: cache columns filled by the last prefill.
        steps: decode tokens stored before the current one.
        position: the cache column of the current token (``prompt + steps``).
        length: columns a dense layer attends to (``position + 1``).
        tail_slot: the ring slot of the current token.
        tail_count: tokens in the ring, the current one included.
        context_len: columns a filter layer may select (prompt and tokens that left the ring).
    """

    def __init__(self, batch: int, device: torch.device) -> None:
        def per_row() -> torch.Tensor:
            return torch.zeros(batch, dtype=torch.long, device=device)

        self.prompt, self.steps, self.position, self.length = per_row(), per_row(), per_row(), per_row()
        self.tail_slot, self.tail_count, self.context_len = per_row(), per_row(), per_row()
        self.rows = torch.arange(batch, device=device)  # 0..batch-1, for per-row indexing

    @property
    def batch(self) -> int:
        return self.rows.numel()

    def prefix(self, count: int) -> DecodeCounters:
        """The counters of the first ``count`` rows (views: the step advances these rows' counters)."""
        view = object.__new__(DecodeCounters)
        for name, tensor in vars(self).items():
            setattr(view, name, tensor[:count])
        return view

    def start(self, prompt: int, steps: int = 0, row: int | None = None) -> None:
        """Begin decoding after a prefill of ``prompt`` columns, in every row or in ``row`` only
        (host values: outside any graph)."""
        where = slice(None) if row is None else slice(row, row + 1)
        self.prompt[where] = prompt
        self.steps[where] = steps

    def advance(self, ring: int) -> None:
        """Enter the next step: every counter from ``steps``, then ``steps += 1`` (device ops only)."""
        torch.add(self.prompt, self.steps, out=self.position)
        torch.add(self.position, 1, out=self.length)
        torch.remainder(self.steps, ring, out=self.tail_slot)
        torch.clamp(self.steps + 1, max=ring, out=self.tail_count)
        torch.add(self.prompt, torch.clamp(self.steps + 1 - ring, min=0), out=self.context_len)
        self.steps.add_(1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.prompt, self.steps, self.position, self.length, self.tail_slot, self.tail_count, self.context_len]


class QueryWindow:
    """The most recent queries of one filter layer (after RoPE), oldest first, and their cache columns.

    Prefill collects them freely (:meth:`extend`); :meth:`start_decode` lays them into a buffer of
    fixed shape that each decode step shifts by one (:meth:`push`: the window is a few queries, so
    the copy is tiny). Slots never filled (a prompt shorter than the window) hold position -1:
    causally they see nothing, so they add nothing to a score. The buffer is reused by later
    requests of the same shape (a captured step keeps pointing at it).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.queries: torch.Tensor | None = None  # [batch, q_heads, size, head_dim] while decoding
        self.positions: torch.Tensor | None = None  # [size] int64
        self._prefill: tuple[torch.Tensor, torch.Tensor] | None = None

    def extend(self, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """Append a prefill chunk's queries ``[batch, heads, n, dim]`` at columns ``positions`` ``[n]``."""
        if self._prefill is not None and self._prefill[0].shape[0] == queries.shape[0]:
            queries = torch.cat([self._prefill[0], queries], dim=2)
            positions = torch.cat([self._prefill[1], positions])
        self._prefill = (queries[:, :, -self.size :].detach(), positions[-self.size :])

    @property
    def has_prefill(self) -> bool:
        """Whether a prefill left queries that :meth:`start_decode` has not laid out yet."""
        return self._prefill is not None

    def forget_prefill(self) -> None:
        self._prefill = None

    def start_decode(self) -> None:
        """Lay the prefill's last ``size`` queries into the decode buffer (empty slots first)."""
        if self._prefill is None:
            return
        queries, positions = self._prefill
        self._prefill = None
        batch, heads, have, dim = queries.shape
        if self.queries is None or self.queries.shape != (batch, heads, self.size, dim):
            self.queries = queries.new_zeros(batch, heads, self.size, dim)
            self.positions = positions.new_full((self.size,), -1)
        self.queries[:, :, : self.size - have].zero_()
        self.positions[: self.size - have].fill_(-1)
        self.queries[:, :, self.size - have :].copy_(queries)
        self.positions[self.size - have :].copy_(positions)

    def take_prefill(self, other: QueryWindow) -> None:
        """Start decoding from the queries ``other`` collected during a prefill, in this window's own
        buffer (a server's slot keeps its window for every request it serves)."""
        self._prefill, other._prefill = other._prefill, None
        self.start_decode()

    def push(self, query: torch.Tensor, position: torch.Tensor) -> None:
        """Add the step's query ``[batch, heads, 1, dim]`` at column ``position`` ``[1]`` (the rows of one
        ``generate`` call share their columns), dropping the oldest."""
        if self.size > 1:
            self.queries[:, :, :-1].copy_(self.queries[:, :, 1:].clone())
            self.positions[:-1].copy_(self.positions[1:].clone())
        self.queries[:, :, -1:].copy_(query)
        self.positions[-1:].copy_(position)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.queries is not None:
            self.queries = self.queries.index_select(0, index.to(self.queries.device))
        if self._prefill is not None:
            self._prefill = (self._prefill[0].index_select(0, index.to(self._prefill[0].device)), self._prefill[1])
