"""The FP8 host tier's format inside Triton kernels: encode, decode, quantize a tile of heads.

The format is :mod:`omnikv_runtime.transfer.fp8`'s (float8 e4m3 codes, a power-of-two float32
scale per group of ``head_dim`` values). The conversions (:func:`fp8_encode`, :func:`fp8_decode`)
are integer arithmetic on the bits, not casts, so that they round to nearest even the same way on
every GPU and under ``TRITON_INTERPRET=1`` (whose float8 casts truncate); a dequantized value then
converts to the model's dtype exactly. The kernels that use them are
:mod:`omnikv_runtime.transfer.triton_gather`'s, in their ``QUANTIZED`` variant.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp8_decode(codes):
    """uint8 e4m3fn codes -> float32 values (exact): the code's bits placed in a float16, times 2**8."""
    bits = codes.to(tl.int32)
    half = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
    return half.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def fp8_encode(y):
    """float32 values with ``|y| <= 448`` -> uint8 e4m3fn codes, rounded to nearest even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    exponent = magnitude >> 23
    mantissa = (magnitude & 0x7FFFFF) | 0x800000
    normal = exponent >= 121  # |y| >= 2**-6, e4m3's smallest normal
    shift = tl.where(normal, 20, tl.minimum(141 - exponent, 25))
    rounded = (mantissa + (1 << (shift - 1)) - 1 + ((mantissa >> shift) & 1)) >> shift
    code = tl.where(normal, (exponent - 121) << 3, 0) + rounded  # a carry moves into the exponent field
    return (code | sign).to(tl.uint8)


@triton.jit
def quantize_groups(x, group_axis: tl.constexpr):
    """float32 ``x`` -> (uint8 codes, float32 scales): one power-of-two scale per group along ``group_axis``."""
    amax = tl.max(tl.abs(x), axis=group_axis)
    bits = amax.to(tl.int32, bitcast=True)
    k = (bits >> 23) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # 448 = 1.75 * 2**8
    k = tl.minimum(tl.maximum(k, -126), 126)
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - k) << 23).to(tl.float32, bitcast=True)
    y = x * tl.expand_dims(inverse, group_axis)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return fp8_encode(y), scale


@triton.jit
def store_quantized(values, code_at, scale_at, inside, live_groups):
    """Quantize a ``[groups, dim]`` tile of values (a head per tile row, zeros in the masked lanes) and store
    its codes at ``code_at`` (masked by ``inside``) and each group's scale at ``scale_at`` (``live_groups``)."""
    codes, scale = quantize_groups(values.to(tl.float32), 1)
    tl.store(code_at, codes, mask=inside)
    tl.store(scale_at, scale, mask=live_groups)
