"""Is one row's decode attention the same whatever else is in the batch? (bf16, Llama-3-8B heads)

The split-K decode attention kernel picks its number of splits from the columns and the number of
(batch row, KV head) pairs. A row's result is then identical for batch 1 and batch 4 only where
both get the same split plan; elsewhere the float32 partial sums combine in another order and the
bf16 output moves by rounding. The linear layers are checked the same way. Prints one line per case.

    python benchmarks/attention_batch_invariance.py
"""

import torch

from omnikv_runtime.kernels import KVSource, decode_attention


def attend(q, k, v, length, cols):
    kk, vv = k[:, :, :cols], v[:, :, :cols]
    lengths = torch.full((q.shape[0],), length, device="cuda")
    return decode_attention(q, [KVSource(kk.transpose(1, 2), vv.transpose(1, 2), length=lengths)], 0.088)


def main() -> None:
    torch.manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(1, 32, 128, device="cuda", dtype=dt)
    k = torch.randn(1, 8, 40000, 128, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    for length, cols in [(4100, 4128), (32800, 32832), (32800, 32865)]:
        one = attend(q, k, v, length, cols)
        four = attend(
            q.expand(4, -1, -1).contiguous(),
            k.expand(4, -1, -1, -1).contiguous(),
            v.expand(4, -1, -1, -1).contiguous(),
            length,
            cols,
        )
        wider = attend(q, k, v, length, cols + 700)
        diff = (four[0].float() - one[0].float()).abs().max()
        print(
            f"attention length {length} columns {cols}: batch 4 row 0 == batch 1: {torch.equal(four[0], one[0])} "
            f"(max diff {diff:.3g}); capacity +700 == : {torch.equal(wider, one)}"
        )
    w = torch.randn(14336, 4096, device="cuda", dtype=dt)
    x = torch.randn(1, 4096, device="cuda", dtype=dt)
    y1 = torch.nn.functional.linear(x, w)
    y4 = torch.nn.functional.linear(torch.cat([x, torch.randn(3, 4096, device="cuda", dtype=dt)]), w)
    y8 = torch.nn.functional.linear(torch.cat([x, torch.randn(7, 4096, device="cuda", dtype=dt)]), w)
    diff = (y8[0].float() - y1[0].float()).abs().max()
    print(
        "linear 4096->14336: row 0 of 4 rows == 1 row:",
        torch.equal(y4[0], y1[0]),
        "of 8 rows:",
        torch.equal(y8[0], y1[0]),
        f"max diff {diff:.3g}",
    )


if __name__ == "__main__":
    main()
