#!/usr/bin/env bash
# Exact pinning and the FP8 host tier on one CUDA machine (an H200 with 128 GiB of host memory):
# the GPU tests of the host tier, then decode at the planner's longest context with a model-dtype
# (bf16) and an FP8 host tier, then the decode benchmark with both tiers. Logs and JSON under $OUT.
# About 6-8 minutes of device time. Usage: OUT=/path bash benchmarks/gpu_fp8_capacity.sh
set -u
export OUT=${OUT:-/tmp/omnikv_out}
export PYTEST_ARGS="${PYTEST_ARGS:-tests/test_gpu_capacity.py tests/test_gpu.py tests/test_gpu_decode.py}"
exec bash "$(dirname "$0")/gpu_session.sh" tests capacity fp8decode
