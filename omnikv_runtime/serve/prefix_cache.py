"""Prefix reuse: the KV of prompt prefixes the server has prefilled, kept by fixed-size token blocks.

Many requests about one long document begin with the same tokens. :class:`PrefixCache` keeps the KV of the
prompts' full blocks of ``block_tokens`` tokens, so that a later prompt beginning with the same blocks copies
their KV into its slot and prefills only the rest (its suffix).

- **Matching.** A block is named by a digest of its tokens chained with the digest of the block before it, so
  a block matches only where every token before it matches too. Only full blocks are kept and matched, and a
  lookup also checks each block's tokens and parent (a digest is never trusted alone).
- **What is kept.** Per block, the dense layers' keys and values (in pools on the compute device, beside the
  slots' dense buffers) and each segment's host-tier rows of the sparse layers (in the arena's storage dtype,
  FP8 codes and their scales included; in pinned host memory when the tier is offloaded). Copies are exact.
- **What is not kept.** What the decode phase derives from the prompt's last tokens: the filter layers' query
  windows come from prefilling the suffix, so a match always leaves at least ``max(1, window_size)`` tokens to
  prefill (the first token's logits, and the window, come from that prefill); the selection policy's
  per-request state is empty after any prefill (policies write it while decoding), so nothing of it is kept.
- **Numerics.** Reusing ``n`` tokens is a prefill with a chunk boundary at column ``n``: the suffix reads the
  prefix's sparse-layer KV back from the host tier, as any later chunk does (FP8-rounded with an FP8 tier).
- **In place.** A slot keeps the KV of the last prompt prefilled into it until the next request overwrites it. A
  request whose prompt begins with blocks its slot still holds reuses them where they are, with no copy (the
  scheduler gives a request the free slot holding most of its prefix), and copies from the pools only the blocks
  after them. So questions sent one after another about one document copy nothing at all; the slot's blocks
  count even after the pools evicted them.
- **Budget.** The pools are allocated once, at ``budget_bytes`` in all (every memory counted; see
  :func:`block_bytes` for a block's GPU and host parts, which the server's memory check adds to its slots').
  When they are full, storing evicts the least recently used block that no admission of the current turn
  copies from; blocks of a chain are touched last to first, so a chain loses its tail before its head.

Every rank of a tensor-parallel server runs the same loads and stores in the same order (the turn plans carry
each admission's reused tokens), so every rank's store holds the same blocks, each of its own heads.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
from array import array
from dataclasses import dataclass

import torch

from omnikv_runtime.cache.adapter import OmniKVCache
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.transfer import fp8

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_TOKENS = 64
# what :meth:`PrefixCache.metrics` reports (the scheduler reports zeros without a prefix cache)
PREFIX_METRICS = (
    "prefix_cache_lookup_tokens_total",
    "prefix_cache_hit_tokens_total",
    "prefix_cache_evictions_total",
    "prefix_cache_in_place_tokens_total",
    "prefix_cache_blocks",
    "prefix_cache_gpu_bytes",
    "prefix_cache_host_bytes",
)


def block_bytes(engine, block_tokens: int) -> tuple[int, int]:
    """Bytes of one block ``(gpu, host)``: the dense layers' KV on the compute device, and the sparse layers'
    host-tier rows (counted as GPU memory when the tier is not offloaded, ``offload.device`` "none"). This rank's
    heads."""
    geometry = engine.geometry
    kv_heads = geometry.kv_heads // engine.config.distributed.tp_size
    dtype_bytes = next(engine.model.parameters()).element_size()
    sparse = len(engine.plan.sparse_layers)
    dense = len(engine.plan.roles) - sparse
    quantized = fp8.is_quantized(engine.transfer.host_dtype)
    gpu = block_tokens * dense * 2 * kv_heads * geometry.head_dim * dtype_bytes
    host = block_tokens * fp8.packed_row_bytes(sparse, kv_heads, geometry.head_dim, dtype_bytes, quantized)
    return (gpu, host) if engine.config.offload.device == "cpu" else (gpu + host, 0)


def check_budget(budget_bytes: object, block_tokens: object) -> None:
    """Raise ConfigError for a budget that is not a whole number of bytes of at least 0, or a block size below 1."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ConfigError(
            "prefix_cache_bytes", budget_bytes, "a whole number of bytes, at least 0 (0: no prefix reuse)"
        )
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ConfigError("prefix_block_tokens", block_tokens, "a whole number of tokens, at least 1")


def planned_blocks(engine, budget_bytes: int, block_tokens: int) -> int:
    """Blocks a store of ``budget_bytes`` holds (ConfigError when the budget is above 0 but below one block)."""
    check_budget(budget_bytes, block_tokens)
    one = sum(block_bytes(engine, block_tokens))
    blocks = budget_bytes // one
    if budget_bytes and not blocks:
        raise ConfigError(
            "prefix_cache_bytes",
            budget_bytes,
            f"0 (no prefix reuse) or at least {one} bytes: one block of {block_tokens} tokens of this model",
        )
    return blocks


def planned_pools(engine, budget_bytes: int, block_tokens: int) -> tuple[int, tuple[int, int]]:
    """Blocks a store of ``budget_bytes`` holds, and its pools' bytes ``(GPU, host)`` (see :func:`block_bytes`)."""
    blocks = planned_blocks(engine, budget_bytes, block_tokens)
    return blocks, tuple(blocks * size for size in block_bytes(engine, block_tokens))


@dataclass
class _Block:
    index: int  # its place in the pools
    parent: bytes  # the digest of the block before it (b"" for a prompt's first block)
    tokens: tuple[int, ...]


class PrefixCache:
    """Stored prompt blocks and their KV (see the module docstring).

    Args:
        engine: the server's engine (its plan, transfer engine and model dtype).
        tiers_like: the slot cache's tiers (the pools take their layers' shapes and devices).
        blocks: blocks held at most (:func:`planned_blocks`).
        block_tokens: tokens per block.
        keep_tokens: tokens a match always leaves to prefill (at least 1; the query window's size).
    """

    def __init__(self, engine, tiers_like, blocks: int, block_tokens: int, keep_tokens: int) -> None:
        self.block_tokens, self.capacity, self.keep_tokens = block_tokens, blocks, max(1, keep_tokens)
        self.transfer = engine.transfer
        self.gpu_block_bytes, self.host_block_bytes = block_bytes(engine, block_tokens)
        columns = blocks * block_tokens  # block i holds columns i * block_tokens onwards of every pool
        dense = tiers_like.dense_layers
        self.dense = None  # [layers, 2 (keys, values), kv_heads, columns, head_dim], like the slots' buffers
        if dense:
            like = dense[0].key_buffer
            shape = (len(dense), 2, like.shape[1], columns, like.shape[3])
            self.dense = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.rows: list[torch.Tensor | None] = []  # per segment: [columns, *row_shape], the arena's storage
        self.scales: list[torch.Tensor | None] = []  # per segment (FP8 tier): [columns, layers, 2, kv_heads]
        for arena in tiers_like.arenas:
            rows = scales = None
            if arena is not None and arena.row_shape[0]:
                raw = torch.uint8 if arena.quantized else arena.storage_dtype
                rows = self.transfer.allocate_host((columns, *arena.row_shape), raw)
                if arena.quantized:
                    scales = self.transfer.allocate_host((columns, *arena.row_shape[:-1]), fp8.SCALE_DTYPE)
            self.rows.append(rows)
            self.scales.append(scales)
        self._blocks: collections.OrderedDict[bytes, _Block] = collections.OrderedDict()  # least recent first
        self._free = list(range(blocks))
        self._busy: set[bytes] = set()  # blocks an admission of this turn copied from: never evicted this turn
        self._resident: dict[int, list[bytes]] = {}  # per slot: digests of the leading blocks its rows hold
        self._written: dict[int, int] = {}  # per slot: when (a count of loads and stores) its blocks were written
        self._clock = itertools.count(1)
        self.counts = collections.Counter()  # lookup_tokens, hit_tokens, in_place_tokens, stored_blocks, evictions

    # naming blocks ----------------------------------------------------------------------------------
    def keys(self, ids: list[int], tokens: int | None = None) -> list[tuple[bytes, bytes, tuple[int, ...]]]:
        """``(digest, parent digest, tokens)`` of each full block of ``ids[:tokens]``."""
        stop = len(ids) if tokens is None else tokens
        named, parent = [], b""
        for start in range(0, stop - self.block_tokens + 1, self.block_tokens):
            block = tuple(ids[start : start + self.block_tokens])
            digest = hashlib.blake2b(parent + array("q", block).tobytes(), digest_size=16)
            named.append((digest.digest(), parent, block))
            parent = named[-1][0]
        return named

    def _held(self, key: bytes, parent: bytes, tokens: tuple[int, ...]) -> _Block | None:
        block = self._blocks.get(key)
        return block if block is not None and block.parent == parent and block.tokens == tokens else None

    # the scheduler's question (rank 0) ------------------------------------------------------------------
    def in_place(self, ids: list[int], row: int) -> int:
        """Leading blocks of ``ids`` (leaving ``keep_tokens`` to prefill) whose KV slot ``row`` still holds."""
        return self._in_place(self.keys(ids, len(ids) - self.keep_tokens), row)

    def _in_place(self, named: list[tuple[bytes, bytes, tuple[int, ...]]], row: int) -> int:
        count = 0
        for (key, _, _), held in zip(named, self._resident.get(row, [])):
            if key != held:
                break
            count += 1
        return count

    def best_row(self, ids: list[int], rows: list[int]) -> int:
        """Of the free slots ``rows``, the one holding most of ``ids``' prefix; on a tie one holding no blocks, else
        the one whose blocks were written longest ago (another prompt's prefix stays for its next question, as
        the pools keep the most recently used blocks), then the first."""
        named = self.keys(ids, len(ids) - self.keep_tokens)

        def preference(row: int) -> tuple:
            return (
                self._in_place(named, row),
                not self._resident.get(row),
                -self._written.get(row, 0),
                -rows.index(row),
            )

        return max(rows, key=preference)

    def match(self, ids: list[int], row: int | None = None) -> int:
        """Tokens of ``ids`` whose KV slot ``row`` holds or the pools can copy in (whole blocks, leaving
        ``keep_tokens`` to prefill). Changes nothing: :meth:`load` copies them and marks the blocks used."""
        in_place = 0 if row is None else self.in_place(ids, row)
        reusable = 0
        for number, (key, parent, tokens) in enumerate(self.keys(ids, len(ids) - self.keep_tokens)):
            if number >= in_place and self._held(key, parent, tokens) is None:
                break
            reusable += self.block_tokens
        return reusable

    def lookup(self, ids: list[int], row: int | None = None) -> int:
        """:meth:`match` for a request admitted into slot ``row``, counted in the metrics."""
        reusable = self.match(ids, row)
        self.counts["lookup_tokens"] += len(ids)
        self.counts["hit_tokens"] += reusable
        return reusable

    # every rank, as the turn plan says ---------------------------------------------------------------
    def begin_turn(self) -> None:
        """A new turn: the blocks copied from in the last one may be evicted again."""
        self._busy.clear()

    def load(self, cache: OmniKVCache, ids: list[int], tokens: int, row: int) -> None:
        """Slot ``row``, whose fresh batch-1 ``cache`` a new request's prefill will run through, holds the KV of
        ``ids[:tokens]`` (whole blocks; 0: none): the blocks the slot still holds stay where they are, the rest
        are copied in from the pools (all held). Called at every admission, so the slot forgets what the prefill
        will overwrite. The copied blocks become the most recently used and stay until the next turn."""
        named = self.keys(ids, tokens)
        in_place = self._in_place(named, row)
        copied = named[in_place:]
        blocks = [self._held(*name) for name in copied]
        if len(named) * self.block_tokens != tokens or any(block is None for block in blocks):
            raise RuntimeError(f"the prefix cache does not hold the first {tokens} tokens the turn plan reuses")
        if cache.tiers.length():
            raise RuntimeError("a prefix is loaded into an empty slot only")
        self._resident[row] = [key for key, _, _ in named[:in_place]]  # the prefill overwrites what follows
        self._written[row] = next(self._clock)
        if not tokens:
            return
        pairs = [(in_place + number, block.index) for number, block in enumerate(blocks)]
        self._copy(cache, pairs, into_slot=True)
        self._resident[row] = [key for key, _, _ in named]
        cache.tiers.advance(tokens)  # every layer and arena counts the tokens now in place
        self.counts["in_place_tokens"] += in_place * self.block_tokens
        for key, _, _ in reversed(copied):  # the head of the chain is the most recent: evicted last
            self._blocks.move_to_end(key)
            self._busy.add(key)

    def forget(self) -> None:
        """Let no slot reuse what its rows hold (after they were overwritten outside the server's turns)."""
        self._resident.clear()

    def store(self, cache: OmniKVCache, ids: list[int], row: int) -> int:
        """Copy in the full blocks of the prompt ``ids`` just prefilled through ``cache`` (slot ``row``) that are
        not held yet (evicting the least recently used blocks as needed); returns the blocks copied in. The slot
        holds them all until its next request."""
        named = self.keys(ids)
        self._resident[row] = [key for key, _, _ in named]
        self._written[row] = next(self._clock)
        if not named or not self.capacity:
            return 0
        chain = {key for key, _, _ in named}
        new: list[tuple[int, int]] = []  # (block of the prompt, pool index)
        for number, (key, parent, tokens) in enumerate(named):
            if self._held(key, parent, tokens) is not None:
                continue
            stale = self._blocks.pop(key, None)  # another block under the same digest (never seen) gives way
            if stale is not None:
                self._free.append(stale.index)
            index = self._take(chain)
            if index is None:  # every block is in use this turn or part of this prompt: the rest is not kept
                logger.debug(
                    "prefix cache full: %d of the prompt's %d blocks not kept", len(named) - number, len(named)
                )
                break
            self._blocks[key] = _Block(index, parent, tokens)
            new.append((number, index))
        for key, _, _ in reversed(named):
            if key in self._blocks:
                self._blocks.move_to_end(key)
        self._copy(cache, new, into_slot=False)
        self.counts["stored_blocks"] += len(new)
        return len(new)

    def _take(self, protected: set[bytes]) -> int | None:
        if self._free:
            return self._free.pop(0)
        for key in self._blocks:  # least recently used first
            if key not in self._busy and key not in protected:
                self.counts["evictions"] += 1
                return self._blocks.pop(key).index
        return None

    def _copy(self, cache: OmniKVCache, pairs: list[tuple[int, int]], into_slot: bool) -> None:
        """Copy blocks between the slot of the batch-1 ``cache`` and the pools: ``(block of the prompt, pool index)``
        pairs, in runs consecutive on both sides (one copy per run, layer and side; no temporary)."""
        runs: list[list[int]] = []  # [block of the prompt, pool index, blocks]
        for number, index in pairs:
            if runs and runs[-1][0] + runs[-1][2] == number and runs[-1][1] + runs[-1][2] == index:
                runs[-1][2] += 1
            else:
                runs.append([number, index, 1])
        if not runs:
            return
        tiers, size = cache.tiers, self.block_tokens
        self.transfer.synchronize()  # the prefill's writes to the host tier have landed; nothing in flight there
        for number, index, count in runs:
            slot, pool = slice(number * size, (number + count) * size), slice(index * size, (index + count) * size)
            places = []  # (the slot's columns, the pool's)
            for layer_number, layer in enumerate(tiers.dense_layers):
                places.append((layer.key_buffer[0, :, slot], self.dense[layer_number, 0, :, pool]))
                places.append((layer.value_buffer[0, :, slot], self.dense[layer_number, 1, :, pool]))
            for arena, rows, scales in zip(tiers.arenas, self.rows, self.scales, strict=True):
                if rows is not None:
                    places.append((_raw(arena.data)[0, slot], rows[pool]))
                if scales is not None:
                    places.append((arena.scales[0, slot], scales[pool]))
            for in_slot, in_pool in places:
                (in_slot.copy_(in_pool) if into_slot else in_pool.copy_(in_slot))

    # reporting --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, int]:
        """Tokens looked up and found (admissions), blocks evicted, tokens reused in place (no copy), and blocks held
        with their bytes."""
        held = len(self._blocks)
        counts = self.counts
        values = (counts["lookup_tokens"], counts["hit_tokens"], counts["evictions"], counts["in_place_tokens"], held)
        values += (held * self.gpu_block_bytes, held * self.host_block_bytes)
        return dict(zip(PREFIX_METRICS, values, strict=True))


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """FP8 codes as bytes (indexing and copies of any kind work on them), else the tensor itself."""
    return tensor.view(torch.uint8) if fp8.is_quantized(tensor.dtype) else tensor
