"""Where a chunked prefill's time goes, against transformers' one-shot prefill (CUDA, same process).

Llama-3-8B geometry, random bf16 weights, batch 1. Times (after a warm-up of each) and the top
kernels of a torch.profiler trace for: transformers' one-shot prefill; the engine's chunked
prefill (GPU mode) as it reads the sparse layers' KV from the host tier (strided: the layers of a
segment are packed per token); and the same with those reads made contiguous first.

    python benchmarks/prefill_anatomy.py --context 32768
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch

import omnikv_runtime as okv
from omnikv_runtime.transfer.torch_engine import TorchTransferEngine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import FILTER_LAYERS, random_model  # noqa: E402


def profiled(run) -> tuple[float, list]:
    run()
    torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "t.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path, encoding="utf-8"))["traceEvents"]
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.get("cat") == "kernel":
            kernels[event["name"][:70]][0] += 1
            kernels[event["name"][:70]][1] += event["dur"] / 1e3
    top = sorted(kernels.items(), key=lambda item: -item[1][1])[:8]
    return seconds, [(name, count, round(ms, 1)) for name, (count, ms) in top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--chunk-size", type=int, default=4096)
    args = parser.parse_args(argv)
    _, model, config, _ = random_model("cuda", False)
    ids = torch.randint(100, config.vocab_size, (1, args.context), device="cuda")
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "context": args.context}

    def hf() -> None:
        with torch.inference_mode():
            model(ids, logits_to_keep=1)

    result["hf_one_shot"] = profiled(hf)
    engine = okv.initialize(
        model,
        {
            "omnikv": {"filter_layers": FILTER_LAYERS, "wait_layers": 1, "token_budget": 2048},
            "offload": {"device": "none"},
            "prefill": {"chunk_size": args.chunk_size},
        },
    )

    def ours() -> None:
        engine.generate(ids, max_new_tokens=1)

    result["engine_strided_reads"] = profiled(ours)
    original = TorchTransferEngine.read_rows

    def contiguous(self, arena, slot, stop, start=0):
        keys, values = original(self, arena, slot, stop, start)
        return keys.contiguous(), values.contiguous()

    TorchTransferEngine.read_rows = contiguous
    result["engine_contiguous_reads"] = profiled(ours)
    TorchTransferEngine.read_rows = original
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
