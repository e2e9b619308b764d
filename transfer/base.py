"""The transfer interface: how KV rows move between the host tier and the compute device.

One small interface, two implementations: :class:`~omnikv_runtime.transfer.torch_engine.TorchTransferEngine`
(any machine; plain torch indexing and copies) and the GPU engine (pinned arena, Triton gather on
its own CUDA stream, events per layer) that implements the same methods.

All tensors in the host tier are token-major: ``[batch, tokens, layers, 2, kv_heads, head_dim]``,
the sparse layers of one segment packed per token, so one selected token is one contiguous row.

An FP8 host tier (``host_dtype`` float8_e4m3fn, :mod:`omnikv_runtime.transfer.fp8`) holds codes in
that layout and float32 ``scales`` ``[batch, tokens, layers, 2, kv_heads]`` beside them; every
method that touches the tier takes them as ``scales``. Writes quantize, reads dequantize: what
reaches the compute device is in the model's dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omnikv_runtime.transfer.hot_cache import HotCache


@dataclass
class TransferStats:
    """Counters of what moved, reset per generate call."""

    bytes_fetched: int = 0  # selected rows read from the host tier (without a hot cache; see HotCache.counters)
    bytes_written: int = 0  # KV rows written into the host tier (prefill offload + decode write-back)
    bytes_prefill_read: int = 0  # host rows read back for full attention during chunked prefill
    gathers: int = 0
    pinned_fallbacks: int = 0  # pinned allocations that failed and fell back to pageable memory
    # byte counts are of the host tier's storage: FP8 codes plus their scales for an FP8 tier

    def copy(self) -> TransferStats:
        return TransferStats(**self.as_dict())

    def minus(self, other: TransferStats) -> TransferStats:
        """The counts since ``other`` was copied."""
        return TransferStats(**{name: value - getattr(other, name) for name, value in self.as_dict().items()})

    def add_(self, other: TransferStats) -> None:
        for name, value in other.as_dict().items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {
            "bytes_fetched": self.bytes_fetched,
            "bytes_written": self.bytes_written,
            "bytes_prefill_read": self.bytes_prefill_read,
            "gathers": self.gathers,
            "pinned_fallbacks": self.pinned_fallbacks,
        }


class TransferEngine(ABC):
    """Moves KV rows between a host tier and the compute device.

    Args:
        compute_device: where attention runs (the "GPU tier"; CPU on a machine without CUDA).
        host_device: where the host tier lives: CPU memory for offload, else the compute device.
        pin_memory: pin host allocations (only meaningful with CUDA).
        fetches_rows: whether a decode step copies its selected rows into a working buffer on the
            compute device (:meth:`gather_rows`) or attention reads them in place. Default: when
            the host tier sits in another memory. A CPU-only run of an offload config sets it, so
            that it runs the same fetch path as a GPU machine (both tiers then share one memory).
        host_dtype: the host tier's element type, or None for the model's dtype; float8_e4m3fn
            makes it an FP8 tier (only where rows are fetched: attention never reads it in place).
    """

    name = "abstract"

    def __init__(
        self,
        compute_device: torch.device,
        host_device: torch.device,
        pin_memory: bool,
        fetches_rows: bool | None = None,
        host_dtype: torch.dtype | None = None,
    ) -> None:
        self.compute_device = torch.device(compute_device)
        self.host_device = torch.device(host_device)
        self.pin_memory = pin_memory
        self.fetches_rows = self.offloaded if fetches_rows is None else fetches_rows
        if host_dtype is not None and not self.fetches_rows:
            raise ValueError(f"a {host_dtype} host tier needs an engine that fetches rows (offload.device='cpu')")
        self.host_dtype = host_dtype
        self.stats = TransferStats()

    @property
    def offloaded(self) -> bool:
        """True when the host tier sits in another memory than the compute device."""
        return self.host_device != self.compute_device

    @abstractmethod
    def allocate_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Allocate a host-tier tensor (pinned when asked and possible)."""

    @abstractmethod
    def write_rows(
        self,
        arena: torch.Tensor,
        slot: int,
        start: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        scales: torch.Tensor | None = None,
    ) -> None:
        """Store ``keys``/``values`` ``[batch, kv_heads, n, head_dim]`` at tokens ``start..start+n`` of ``slot``."""

    @abstractmethod
    def read_rows(
        self,
        arena: torch.Tensor,
        slot: int,
        stop: int,
        start: int = 0,
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``start..stop`` of layer ``slot`` on the compute device: ``[batch, kv_heads, n, head_dim]``
        (in ``dtype``, the model's, when the tier is FP8)."""

    def prefetch_rows(
        self,
        arena: torch.Tensor,
        slot: int,
        stop: int,
        start: int = 0,
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Start reading tokens ``start..stop`` of layer ``slot``, so that a later :meth:`read_rows` of
        exactly those tokens finds them on the compute device. Engines that read synchronously
        ignore it."""
        return None

    def discard_prefetches(self) -> None:
        """Drop reads started by :meth:`prefetch_rows` that no layer has taken."""
        return None

    @abstractmethod
    def gather_rows(
        self,
        arena: torch.Tensor,
        indices: torch.Tensor,
        staging: torch.Tensor,
        hot: HotCache | None = None,
        scales: torch.Tensor | None = None,
        real_rows: int | None = None,
    ) -> None:
        """Fetch the tokens ``indices`` ``[batch, k]`` of every layer slot into ``staging``.

        ``staging`` is ``[batch, k, layers, 2, kv_heads, head_dim]`` on the compute device, packed
        like the arena's rows; sparse layers read their slice of it in place. With a ``hot``
        cache, rows it holds are read from it and only the others come from ``arena``. Without one,
        a lane of ``indices`` holding -1 fetches nothing and leaves its ``staging`` row as it was (the
        padding of a batch whose rows select fewer tokens, or none: attention masks those lanes);
        ``real_rows``, when given, is how many lanes are not -1 (the byte counter's count; the
        indices stay on the device). An engine that fetches asynchronously makes :meth:`wait` order
        each layer after its rows.
        """

    @abstractmethod
    def write_row(
        self,
        arena: torch.Tensor,
        position: torch.Tensor,
        ring: torch.Tensor,
        slot: torch.Tensor,
        scales: torch.Tensor | None = None,
    ) -> None:
        """Decode write-back: ``arena[b, position[b]] = ring[b, slot[b]]`` for each batch row (packed
        rows; both indices int64 ``[batch]`` tensors on the compute device, so no host value is involved)."""

    @abstractmethod
    def wait(self, arena: torch.Tensor, slot: int) -> None:
        """Make the compute stream wait until the rows gathered from ``arena`` for layer ``slot`` have landed."""

    def graph_safe(self, arena: torch.Tensor) -> bool:
        """Whether this engine's decode-step work on ``arena`` can be captured in a CUDA graph (no
        value needs to reach the host)."""
        return arena.device == self.compute_device

    def synchronize(self) -> None:
        """Block the host until every transfer queued so far has finished (before the host touches the arena).

        Nothing to do for engines whose copies are ordered on the current stream.
        """
        return None

    def reset_stats(self) -> None:
        self.stats = TransferStats(pinned_fallbacks=self.stats.pinned_fallbacks)
