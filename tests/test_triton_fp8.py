"""The FP8 host tier's Triton kernels under TRITON_INTERPRET=1, on CPU tensors, against the torch
quantizer (itself checked against a plain reference in test_fp8_host_tier.py), outputs poisoned.

The kernels round with integer arithmetic, so they must equal torch's cast bit for bit, including
ties and subnormals. The interpreter must be chosen before triton is imported: a child process.
"""

from __future__ import annotations

import subprocess

import pytest
from okv_testlib import run_in_triton_interpreter

CHECK = r"""
import torch
import triton
import triton.language as tl
from omnikv_runtime.transfer import fp8
from omnikv_runtime.transfer.triton_fp8 import fp8_decode, fp8_encode
from omnikv_runtime.transfer.triton_gather import copy_row, gather_rows, scatter_rows

FP8, POISON = torch.float8_e4m3fn, 0x7F
torch.manual_seed(0)
as_bytes = lambda t: t.view(torch.uint8)


@triton.jit
def round_trip(x, codes, back, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    c = fp8_encode(tl.load(x + offsets, mask=inside, other=0.0))
    tl.store(codes + offsets, c, mask=inside)
    tl.store(back + offsets, fp8_decode(c), mask=inside)


# every finite code, the midpoints between neighbours (ties) and the floats next to them, random values
table = torch.arange(256, dtype=torch.uint8).view(FP8).float()
finite = table[torch.isfinite(table)].unique()
middle = (finite[1:] + finite[:-1]) / 2
x = torch.cat([
    finite, middle, torch.nextafter(middle, torch.tensor(1e9)), torch.nextafter(middle, torch.tensor(-1e9)),
    torch.cat([torch.randn(20000) * s for s in (1e-3, 1.0, 100.0)]).clamp(-448, 448),
    torch.tensor([0.0, -0.0, 1e-40, 2.0**-10, 3 * 2.0**-10]),
])
codes = torch.empty(x.shape, dtype=torch.uint8)
back = torch.empty(x.shape)
round_trip[(triton.cdiv(x.numel(), 1024),)](x, codes, back, x.numel(), BLOCK=1024)
assert torch.equal(codes, as_bytes(x.to(FP8))), (x[codes != as_bytes(x.to(FP8))][:5])
assert torch.equal(back, codes.view(FP8).float())

# decode write-back: one packed ring row quantized into a poisoned arena at a device-side position;
# a long row (Llama-like: 3 layers x K,V x 8 heads x 128) spreads over several programs
for shape, dtype in [((2, 4, 3, 2, 2, 16), torch.bfloat16), ((1, 3, 3, 2, 8, 128), torch.float32)]:
    ring = (torch.randn(shape) * torch.logspace(-6, 6, shape[-1])).to(dtype)
    ring[0, 2, 0, 1, 0] = 0.0
    arena = torch.empty((shape[0], 12, *shape[2:]), dtype=FP8)
    as_bytes(arena).fill_(POISON)
    scales = torch.full(arena.shape[:-1], float("nan"))
    copy_row(arena, torch.tensor([9]), ring, torch.tensor([2]), scales=scales)
    want_codes, want_scales = fp8.quantize(ring[:, 2])
    assert torch.equal(as_bytes(arena[:, 9]), as_bytes(want_codes)) and torch.equal(scales[:, 9], want_scales)
    assert (as_bytes(arena[:, :9]) == POISON).all() and (as_bytes(arena[:, 10:]) == POISON).all()
    assert torch.isnan(scales[:, :9]).all() and torch.isnan(scales[:, 10:]).all()
    if shape[0] == 2:  # per-row positions (a server's rows): row b's ring slot source[b] lands at target[b]
        copy_row(arena, torch.tensor([4, 0]), ring, torch.tensor([1, 3]), scales=scales)
        for b, (at, slot) in enumerate([(4, 1), (0, 3)]):
            want_codes, want_scales = fp8.quantize(ring[b : b + 1, slot])
            assert torch.equal(as_bytes(arena[b, at]), as_bytes(want_codes[0]))
            assert torch.equal(scales[b, at], want_scales[0])
        assert (as_bytes(arena[0, 5:9]) == POISON).all() and (as_bytes(arena[1, 1:9]) == POISON).all()

# prefill write: keys/values of any strides into one layer slot; 3 heads and head_dim 24 (not powers of two)
arena = torch.empty((2, 12, 3, 2, 3, 24), dtype=FP8)
as_bytes(arena).fill_(POISON)
scales = torch.full(arena.shape[:-1], float("nan"))
keys = (torch.randn(2, 5, 3, 24) * 50).transpose(1, 2).to(torch.bfloat16)  # [batch, heads, n, dim], strided
values = (torch.randn(2, 3, 5, 24) / 7).to(torch.bfloat16)
scatter_rows(arena, 1, 4, keys, values, scales=scales)
for part, kv in enumerate((keys, values)):
    want_codes, want_scales = fp8.quantize(kv.transpose(1, 2))
    assert torch.equal(as_bytes(arena[:, 4:9, 1, part]), as_bytes(want_codes))
    assert torch.equal(scales[:, 4:9, 1, part], want_scales)
written = torch.zeros(arena.shape[:3], dtype=torch.bool)
written[:, 4:9, 1] = True
assert (as_bytes(arena)[~written] == POISON).all() and torch.isnan(scales[~written]).all()

# the gather dequantizes inside the kernel, into outputs of the model's dtype, whole rows or one layer's slice
source = torch.randn(2, 30, 3, 2, 2, 16) * 20
codes, scales = fp8.quantize(source)
indices = torch.stack([torch.randperm(30)[:7] for _ in range(2)])
for dtype in (torch.bfloat16, torch.float32):
    expected = fp8.dequantize(codes, scales, dtype)[torch.arange(2)[:, None], indices]
    out = torch.full((2, 7, 3, 2, 2, 16), float("nan"), dtype=dtype)
    gather_rows(codes, indices, out, num_programs=3, scales=scales)
    assert torch.equal(out, expected), dtype
    staging = torch.full((2, 7, 3, 2, 2, 16), float("nan"), dtype=dtype)
    gather_rows(codes[:, :, 1], indices, staging[:, :, 1], num_programs=2, scales=scales[:, :, 1])
    assert torch.equal(staging[:, :, 1], expected[:, :, 1]) and torch.isnan(staging[:, :, [0, 2]].float()).all()

# whole Llama-like rows (48 heads of 128: two inner steps of 32 heads) and a head_dim of 24 (masked lanes)
for shape in [(1, 50, 3, 2, 8, 128), (2, 20, 2, 2, 3, 24)]:
    codes, scales = fp8.quantize(torch.randn(shape) * 3)
    picked = torch.stack([torch.randperm(shape[1])[:9] for _ in range(shape[0])])
    out = torch.full((shape[0], 9, *shape[2:]), float("nan"), dtype=torch.bfloat16)
    gather_rows(codes, picked, out, num_programs=2, scales=scales)
    expected = fp8.dequantize(codes, scales, torch.bfloat16)[torch.arange(shape[0])[:, None], picked]
    assert torch.equal(out, expected), shape
codes, scales = fp8.quantize(source)

# without a hot cache a -1 lane (padding) reads nothing and writes nothing
lanes = torch.tensor([[3, -1, 29, -1], [-1, -1, -1, 11]])
out = torch.full((2, 4, 3, 2, 2, 16), float("nan"), dtype=torch.bfloat16)
gather_rows(codes, lanes, out, num_programs=2, scales=scales)
values = fp8.dequantize(codes, scales, torch.bfloat16)
for b in range(2):
    for j in range(4):
        if lanes[b, j] >= 0:
            assert torch.equal(out[b, j], values[b, lanes[b, j]]), (b, j)
        else:
            assert torch.isnan(out[b, j].float()).all(), (b, j)

# through a hot cache (model dtype): -1 reads the slot; a host read is dequantized into its slot too
hot = torch.randn(2, 5, 3, 2, 2, 16).to(torch.bfloat16)
host_rows = torch.tensor([[4, -1, 17, 29, -1], [-1, -1, 0, 8, 3]])
hot_slots = torch.tensor([[0, 2, 4, 1, 3], [1, 0, 4, 4, 2]])
values = fp8.dequantize(codes, scales, torch.bfloat16)
expected, expected_hot = torch.empty(2, 5, 3, 2, 2, 16, dtype=torch.bfloat16), hot.clone()
for b in range(2):
    for j in range(5):
        if host_rows[b, j] >= 0:
            expected[b, j] = expected_hot[b, hot_slots[b, j]] = values[b, host_rows[b, j]]
        else:
            expected[b, j] = hot[b, hot_slots[b, j]]
out = torch.full_like(expected, float("nan"))
for j in range(3):  # one launch per layer, as the engine does
    layer = dict(hot=hot[:, :, j], hot_slots=hot_slots, scales=scales[:, :, j])
    gather_rows(codes[:, :, j], host_rows, out[:, :, j], 2, **layer)
assert torch.equal(out, expected) and torch.equal(hot[:, :4], expected_hot[:, :4])

for bad in (scales[:, :, :, 0], scales.double()):
    try:
        gather_rows(codes, indices, torch.empty(2, 7, 3, 2, 2, 16), scales=bad)
    except ValueError as exc:
        assert "scales" in str(exc)
    else:
        raise AssertionError("mismatched scales were accepted")
print("ok")
"""


def test_fp8_kernels_in_the_interpreter():
    run_in_triton_interpreter(CHECK)


def test_fp8_kernels_compile_for_the_h200_without_spilling(tmp_path, monkeypatch):
    """ptxas (shipped with triton) compiles each FP8 kernel for sm_90 as launched, with no GPU here;
    a kernel that spills registers to the stack would run slower than the PCIe link allows."""
    import inspect
    import pathlib

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omnikv_runtime.transfer import triton_gather

    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip("this triton ships no ptxas/cuobjdump")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the launches' default, stated (no warning)
    i64 = "i64"
    gather_types = {"source": "*u8", "scales": "*fp32", "indices": "*i64", "target": "*bf16", "hot": "*bf16"}
    gather_types.update({"hot_slots": "*i64", "rows_total": i64})
    gather_types.update(
        {f"{t}_{s}_stride": i64 for t in ("source", "scales", "target", "hot") for s in ("batch", "row")}
    )
    quantized = {"BLOCK": None, "QUANTIZED": True}  # the FP8 variant of each kernel, as the launches pick it
    warps = triton_gather.QUANTIZED_GATHER_WARPS
    kernels = [
        (
            triton_gather._gather_rows_kernel,
            gather_types,
            {"ROWS": 4, "GROUPS": 16, "DIM": 128, "HOT": hot, "row_elems": None},
            warps,
        )
        for hot in (False, True)
    ]
    copy_types = {"source": "*bf16", "source_index": "*i64", "target": "*u8", "scales": "*fp32", "target_index": "*i64"}
    copy_types.update({f"{t}_{s}_stride": i64 for t in ("source", "target", "scales") for s in ("batch", "row")})
    kernels.append((triton_gather._copy_row_kernel, copy_types, {"GROUPS": 32, "DIM": 128, "row_elems": None}, 4))
    scatter_types = {"keys": "*bf16", "values": "*bf16", "arena": "*u8", "scales": "*fp32"}
    scatter_types.update({f"{t}_{s}_stride": i64 for t in ("arena", "scales") for s in ("batch", "row")})
    kernels.append((triton_gather._scatter_rows_kernel, scatter_types, {"HEADS": 8, "DIM": 128}, 4))
    kernels = [(kernel, types, {**constants, **quantized}, warps) for kernel, types, constants, warps in kernels]
    for kernel, types, constants, warps in kernels:
        names = list(inspect.signature(kernel.fn).parameters)
        signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in names}
        try:
            source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()})
        except TypeError as exc:
            pytest.skip(f"this triton's ahead-of-time API differs: {exc}")
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        cubin = tmp_path / f"{kernel.fn.__name__}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True, timeout=60)
        line = next(line for line in usage.stdout.splitlines() if "REG:" in line)
        assert " STACK:0 " in line, (kernel.fn.__name__, constants, line)
