"""From a filter layer's query to a selection: the one place a :class:`SelectionContext` is built.

A filter layer's attention hands its query to its cache, and the cache to the :class:`Selector`:
for one request (the rows of one ``generate`` call, or one slot of a server's batch) the selector
builds the policy's context (the recent queries, the keys of the request's selectable context, its
valid columns, its token budget, the rank group with tensor parallelism), calls the policy, and
announces the choice to the engine's listeners. :meth:`Selector.fetch` then stores a segment's
selection and starts fetching its rows, timed for the listeners when there are any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv_runtime.cache.counters import QueryWindow
from omnikv_runtime.cache.segment import SegmentState
from omnikv_runtime.kernels.triton_support import TRITON_AVAILABLE
from omnikv_runtime.listeners import Listeners
from omnikv_runtime.policies import SelectionContext, SelectionPolicy
from omnikv_runtime.transfer import TransferEngine


@dataclass
class Selector:
    """The filter layers' policy call, for every cache of an engine.

    Attributes:
        policy: the selection policy (stateless across requests: per-request state is passed in).
        transfer: the transfer engine whose byte counts time a fetch.
        head_group: with tensor parallelism, the ranks holding the other heads (None otherwise).
        listeners: the engine's listeners (selection and fetch events).
        rope_inv_freq: the model's rotary inverse frequencies (policies that score a window of
            queries turn each to the current position with them), or None.
    """

    policy: SelectionPolicy
    transfer: TransferEngine
    head_group: Any = None
    listeners: Listeners = field(default_factory=Listeners)
    rope_inv_freq: torch.Tensor | None = None

    @property
    def window_size(self) -> int:
        return self.policy.window_size

    def head_max_buffer(self, query: torch.Tensor, width: int) -> torch.Tensor | None:
        """Where a filter layer's decode attention writes the scores of the policy (float32 ``[rows, width]``),
        when the policy reads them (``reads_head_max_logits``) and the attention is the Triton kernel's, which
        scores the keys while it reads them; else None, and the policy scores the keys itself."""
        if not (self.policy.reads_head_max_logits and query.is_cuda and TRITON_AVAILABLE):
            return None
        return torch.empty(query.shape[0], width, dtype=torch.float32, device=query.device)

    def choose(
        self,
        cache: Any,
        step: int,
        layer: int,
        query: torch.Tensor,
        position: torch.Tensor,
        keys: torch.Tensor,
        valid: torch.Tensor,
        token_budget: int,
        scaling: float,
        state: dict[str, Any],
        window: QueryWindow | None = None,
        head_max: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SelectionContext]:
        """One request's selection: sorted indices ``[rows, k]`` and the context the policy saw.

        Args:
            query: the step's query ``[rows, q_heads, 1, head_dim]`` (after RoPE).
            position: ``[1]`` the cache column of the step's token.
            keys: ``[rows, kv_heads, width, head_dim]`` the request's selectable context.
            valid: ``[rows, width]`` which of those columns may be selected.
            token_budget: tokens to select (at most ``width``).
            state: the policy's per-request state for this filter layer.
            window: the request's query window, when the policy reads more than the step's query.
            head_max: ``[rows, width]`` the step's scores from the decode attention (see
                :meth:`head_max_buffer`), or None.
        """
        if window is not None and window.queries is not None:
            window.push(query, position)
            queries, positions = window.queries, window.positions
        else:
            queries, positions = query, position
        context = SelectionContext(
            queries=queries,
            query_positions=positions,
            keys=keys,
            valid=valid,
            token_budget=min(token_budget, keys.shape[2]),
            scaling=scaling,
            layer=layer,
            state=state,
            head_group=self.head_group,
            rope_inv_freq=self.rope_inv_freq,
            head_max_logits=head_max,
        )
        indices = self.policy.select(context)
        self.listeners.announce_selection(cache, step, context, indices)
        return indices, context

    def fetch(
        self,
        cache: Any,
        segment: SegmentState,
        indices: torch.Tensor,
        selectable: torch.Tensor,
        keep: torch.Tensor | None = None,
        kept: int | None = None,
    ) -> bool:
        """Store ``segment``'s selection ``[rows, k]`` and start fetching its rows (``keep``, ``kept``: the
        real entries of a padded selection; see :meth:`SegmentState.set_selection`); returns whether a
        buffer was replaced."""
        replaced = False

        def run() -> int:
            nonlocal replaced
            before = self.transfer.stats.bytes_fetched
            replaced = segment.set_selection(indices, selectable, keep, kept)
            return self.transfer.stats.bytes_fetched - before

        self.listeners.timed_fetch(cache, segment.filter_layer, indices.shape[1], run)
        return replaced
