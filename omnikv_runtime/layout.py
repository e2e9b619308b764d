"""Which layer does what: dense, filter, wait or sparse, and how sparse layers group into segments."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

RESERVE_QUANTUM = 256  # a cache's token capacity rounds up to this: calls of nearby lengths share a captured step


def reserve_tokens(prompt_tokens: int, new_tokens: int) -> int:
    """Token capacity of a cache for ``prompt_tokens`` + ``new_tokens`` (rounded up to the quantum)."""
    return -(-(prompt_tokens + new_tokens) // RESERVE_QUANTUM) * RESERVE_QUANTUM


def tail_ring_tokens(tail_tokens: int | None, reserve: int, prompt_tokens: int) -> int:
    """Slots of the tail ring: the configured ``omnikv.tail_tokens``, else the reserve's new tokens (>= 16)."""
    return tail_tokens or max(16, reserve - prompt_tokens)


class Role(str, Enum):
    DENSE = "dense"  # before the first filter layer: full KV on the GPU, full attention
    FILTER = "filter"  # full attention, and selects tokens for its segment
    WAIT = "wait"  # full attention; its compute hides the fetch for the segment
    SPARSE = "sparse"  # KV in the host tier; attends to the selected tokens plus the tail


@dataclass(frozen=True)
class Segment:
    """A filter layer and the sparse layers that attend to its selection."""

    index: int
    filter_layer: int
    sparse_layers: tuple[int, ...]


@dataclass(frozen=True)
class LayerPlan:
    """The role of each layer for one model and config."""

    num_layers: int
    roles: tuple[Role, ...]
    segments: tuple[Segment, ...]
    segment_of: dict[int, int] = field(default_factory=dict)  # sparse or filter layer -> segment index

    @classmethod
    def build(cls, num_layers: int, filter_layers: list[int], wait_layers: int, enabled: bool = True) -> LayerPlan:
        """The plan for `filter_layers` (already validated against `num_layers`); all dense if not enabled.

        A filter layer whose wait layers reach the next filter layer (or the model's end) leaves its
        segment without a sparse layer: like the original OmniKV, that segment runs dense, so its
        layers are all ``DENSE`` here and it has no :class:`Segment` (its selection would serve no layer).
        """
        if not enabled:
            return cls(num_layers, tuple(Role.DENSE for _ in range(num_layers)), ())
        roles = [Role.DENSE] * num_layers
        segments: list[Segment] = []
        segment_of: dict[int, int] = {}
        bounds = [*filter_layers[1:], num_layers]
        for layer, bound in zip(filter_layers, bounds):
            sparse = tuple(range(layer + 1 + wait_layers, bound))
            if not sparse:
                continue  # a dense segment
            index = len(segments)
            roles[layer] = Role.FILTER
            for wait in range(layer + 1, layer + 1 + wait_layers):
                roles[wait] = Role.WAIT
            for sparse_layer in sparse:
                roles[sparse_layer] = Role.SPARSE
                segment_of[sparse_layer] = index
            segment_of[layer] = index
            segments.append(Segment(index, layer, sparse))
        return cls(num_layers, tuple(roles), tuple(segments), segment_of)

    def role(self, layer: int) -> Role:
        return self.roles[layer]

    @property
    def sparse_layers(self) -> list[int]:
        return [layer for layer, role in enumerate(self.roles) if role is Role.SPARSE]

    def describe(self) -> str:
        letters = {Role.DENSE: "D", Role.FILTER: "F", Role.WAIT: "W", Role.SPARSE: "s"}
        return "".join(letters[role] for role in self.roles)
