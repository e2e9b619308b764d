"""The FP8 host tier's number format: float8 e4m3 with a power-of-two scale per token and KV head.

Each group of ``head_dim`` values (one token's key, or value, of one KV head in one layer) is
stored as float8_e4m3fn codes ``round(x / scale)`` and one float32 ``scale``: the smallest power of
two with ``max|x| / scale <= 448`` (e4m3's largest finite value), kept inside float32's normal range
(``2**-126 .. 2**126``; an all-zero group gets ``2**-126``). Rounding is to nearest, ties to even;
values clamp to +-448.

A power of two keeps every step exact but the one rounding: ``x / scale`` only moves the
exponent, and a dequantized value (at most four significant bits) is exactly representable in
bfloat16, float16 and float32. So the torch path here, the Triton kernels (which round with
integer arithmetic) and a reference quantizer agree bit for bit, on the GPU and on CPU alike.
The relative error of a value is at most 2**-4 (half a step of a 3-bit mantissa), as with an
``amax / 448`` scale; only values below about ``max|x| / 2**14`` of their group lose more (subnormals).
"""

from __future__ import annotations

import torch

from omnikv_runtime.config.sections import HOST_DTYPES

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_DTYPE = torch.float32
MIN_SCALE_EXPONENT = -126
MAX_SCALE_EXPONENT = 126


def storage_dtype(host_dtype: str) -> torch.dtype | None:
    """The host tier's element type for ``offload.host_dtype``, one of the config's :data:`HOST_DTYPES`
    (torch's dtype names; None: ``"auto"``, the model's dtype)."""
    if host_dtype not in HOST_DTYPES:
        raise ValueError(f"host_dtype {host_dtype!r}: one of {list(HOST_DTYPES)} (offload.host_dtype)")
    return None if host_dtype == "auto" else getattr(torch, host_dtype)


def is_quantized(dtype: torch.dtype | None) -> bool:
    """Whether a host tier of this element type keeps scales beside its codes."""
    return dtype == FP8_DTYPE


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """``k`` with ``2**k`` the smallest power of two such that ``amax / 2**k <= 448`` (int32, clamped)."""
    mantissa, exponent = torch.frexp(amax.float())  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    k = exponent - 9 + (mantissa > FP8_MAX / 512).to(exponent.dtype)  # 448 = 0.875 * 2**9
    k = torch.where(amax > 0, k, MIN_SCALE_EXPONENT)
    return k.clamp(MIN_SCALE_EXPONENT, MAX_SCALE_EXPONENT).to(torch.int32)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., head_dim]`` -> (float8_e4m3fn codes ``[..., head_dim]``, float32 scales ``[...]``)."""
    k = scale_exponents(x.abs().amax(dim=-1))
    scaled = torch.ldexp(x.float(), (-k).unsqueeze(-1).float())
    codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, torch.ldexp(torch.ones_like(k, dtype=SCALE_DTYPE), k.float())


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes ``[..., head_dim]`` and scales ``[...]`` back to values of ``dtype`` (exact products)."""
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


def packed_row_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, quantized: bool) -> int:
    """Host bytes of one token of ``layers`` packed layers (keys and values), with scales if quantized."""
    codes = layers * 2 * kv_heads * head_dim * (1 if quantized else dtype_bytes)
    return codes + (layers * 2 * kv_heads * SCALE_DTYPE.itemsize if quantized else 0)
