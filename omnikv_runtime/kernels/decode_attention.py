"""One decode query per head attending to up to two KV sources, without copying them together.

A decode step's attention reads KV that lives in different buffers: a dense layer's full KV with a
length that grows every step; a sparse layer's selected rows and the tail of generated tokens; in
GPU mode, the selected rows read in place from the host tier through their indices. Concatenating
them costs a copy of everything per layer and step, and a growing length changes shapes, which a
CUDA graph cannot replay. So each source is described by a :class:`KVSource` (strided views, plus
a device-side length, a column mask and an index, each optional) and read where it lies.

On CUDA a Triton split-K kernel ("flash-decoding": each program attends one KV head's query group
to one range of columns with an online softmax, a second kernel merges the ranges by their
log-sum-exp) reads each KV row once for all query heads of its group: no ``repeat_kv`` copy. The
ranges' size follows the columns, the KV heads and the number of multiprocessors, so that one
request still fills the GPU; it never follows the batch, so a request's result has the same bits
alone and in any batch (a larger batch runs more ranges of the same size). Lengths are read on the
device, so a step's shapes never change. On any other device :func:`decode_attention_torch`
computes the same function with plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.kernels.triton_support import TRITON_AVAILABLE, multiprocessor_count

if TRITON_AVAILABLE:
    from omnikv_runtime.kernels.decode_attention_triton import decode_attention_triton


@dataclass
class KVSource:
    """Keys and values that a decode query attends to.

    Attributes:
        keys, values: ``[batch, tokens, kv_heads, head_dim]`` views (any strides, unit stride in
            ``head_dim``): a head-major buffer ``[batch, kv_heads, tokens, dim]`` transposed, or one
            layer of a token-major packed store.
        length: int64 ``[batch]`` (or ``[1]``, shared by every row) on the device, or None: only the
            first ``length[b]`` columns of row ``b`` count.
        mask: bool ``[batch, columns]``, or None: columns where it is False do not count (padding).
        index: int64 ``[batch, n]``, or None: the columns are ``keys[b, index[b, j]]`` for
            ``j < n`` instead of every token (``length`` and ``mask`` then refer to ``j``).
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None

    @property
    def columns(self) -> int:
        return self.index.shape[1] if self.index is not None else self.keys.shape[1]


def decode_attention(
    query: torch.Tensor,
    sources: list[KVSource],
    scale: float,
    out: torch.Tensor | None = None,
    head_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``query`` ``[batch, q_heads, head_dim]`` over the columns of ``sources``.

    Query head ``h`` reads KV head ``h // (q_heads // kv_heads)``. A query with no valid column
    gets zeros. Returns ``[batch, q_heads, head_dim]`` in the query's dtype (into ``out`` if given).

    ``head_max`` (float32 ``[batch, width]``, optional) receives a filter layer's scores while the keys are
    read anyway: for each of the first ``width`` columns of the first source (which must have no index),
    ``scale`` times the largest ``q·k`` of any query head, and ``-inf`` where the column does not count
    (masked, past the length, past the source). The OmniKV ``last`` policy's scores, without a second pass
    over the keys.
    """
    if not 1 <= len(sources) <= 2:
        raise ValueError(f"decode attention takes one or two KV sources, got {len(sources)}")
    if head_max is not None:
        _check_head_max(query, sources[0], head_max)
    if query.is_cuda and TRITON_AVAILABLE:
        return decode_attention_triton(query, sources, scale, multiprocessor_count(query.device), out, head_max)
    result = decode_attention_torch(query, sources, scale, head_max)
    if out is None:
        return result
    return out.copy_(result)


def _check_head_max(query: torch.Tensor, first: KVSource, head_max: torch.Tensor) -> None:
    if first.index is not None:
        raise ValueError("head_max scores the first source's own columns: it cannot have an index")
    if head_max.dtype != torch.float32 or head_max.dim() != 2 or head_max.shape[0] != query.shape[0]:
        raise ValueError(f"head_max must be float32 [batch, width], got {head_max.dtype} {tuple(head_max.shape)}")
    if head_max.shape[1] > first.columns or head_max.stride(1) != 1:
        raise ValueError(f"head_max of {head_max.shape[1]} columns for a source of {first.columns} (unit stride)")


def _source_columns(source: KVSource) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values, valid) of one source as dense ``[batch, n, kv_heads, dim]`` and ``[batch, n]``."""
    keys, values = source.keys, source.values
    batch = keys.shape[0]
    if source.index is not None:
        rows = torch.arange(batch, device=keys.device)[:, None]
        keys, values = keys[rows, source.index], values[rows, source.index]
    n = keys.shape[1]
    valid = torch.ones(batch, n, dtype=torch.bool, device=keys.device)
    if source.mask is not None:
        valid = valid & source.mask[:, :n].to(torch.bool)
    if source.length is not None:
        valid = valid & (torch.arange(n, device=keys.device)[None, :] < source.length.view(-1, 1))
    return keys, values, valid


def decode_attention_torch(
    query: torch.Tensor, sources: list[KVSource], scale: float, head_max: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference implementation: the same function with torch ops, in float32."""
    parts = [_source_columns(source) for source in sources]
    keys = torch.cat([p[0] for p in parts], dim=1).float()
    valid = torch.cat([p[2] for p in parts], dim=1)
    values = torch.cat([p[1] for p in parts], dim=1).float().masked_fill(~valid[:, :, None, None], 0.0)
    batch, q_heads, dim = query.shape
    kv_heads = keys.shape[2]
    grouped = query.float().reshape(batch, kv_heads, q_heads // kv_heads, dim)
    logits = torch.einsum("bhgd,bthd->bhgt", grouped, keys) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    if head_max is not None:
        head_max.copy_(logits[..., : head_max.shape[1]].amax(dim=(1, 2)))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query with nothing to see gets zeros
    output = torch.einsum("bhgt,bthd->bhgd", probs, values)
    return output.reshape(batch, q_heads, dim).to(query.dtype)
