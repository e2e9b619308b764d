"""The servers ``serve_peer.py`` compares, each in a process of its own on a free loopback port, and the peak
memory each takes while it runs.

:class:`ServerProcess` starts a command in a new process group, waits until ``/health`` answers (or the
process exits: its log's last lines say why), and stops it with SIGINT (a graceful stop), then SIGTERM,
then SIGKILL, to its own group only. :func:`omnikv_server` and :func:`transformers_server` build the two
commands; :class:`PeakMemory` samples the memory the server takes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import psutil
import torch
from decode import FILTER_LAYERS

SAMPLE_S = 0.2  # memory sampling period
STOP_GRACE_S = (30.0, 10.0)  # after SIGINT, then after SIGTERM, before the next signal
LOG_LINES = 12  # lines of a server's log quoted when it does not start
CPU_BLOCK_TOKENS = 32  # the peer's KV block on the CPU


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One server's process (see the module docstring); ``model_name`` is what requests name as their model."""

    def __init__(self, command: list[str], log_path: str, port: int, model_name: str) -> None:
        self.command, self.log_path, self.port, self.model_name = command, log_path, port, model_name
        self.url = f"http://127.0.0.1:{port}/v1"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        """Start it and wait until ``/health`` answers; RuntimeError when it exits first or takes too long."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with status {self.process.returncode} before answering: {self.log_tail()}")
            if self.answers():
                return
            time.sleep(0.5)
        raise RuntimeError(f"did not answer /health within {timeout:g} s: {self.log_tail()}")

    def answers(self) -> bool:
        """Whether ``/health`` (or, for a server without it, ``/v1/models``) answers 200."""
        for path in ("/health", "/v1/models"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as answer:
                    if answer.status == 200:
                        return True
            except OSError:
                continue
        return False

    def log_lines(self, containing: str) -> list[str]:
        """The lines of its log that contain ``containing``."""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return [line.strip() for line in log if containing in line]

    def log_tail(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return " | ".join(line.strip() for line in log.read().splitlines()[-LOG_LINES:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        """SIGINT to its process group, then SIGTERM, then SIGKILL, each after its grace."""
        if self.process is None:
            return
        for sent, grace in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), (*STOP_GRACE_S, 10.0)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sent)
            except ProcessLookupError:
                break
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        if self.process.poll() is None:  # the leader is gone, a child may not be: the group once more
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def omnikv_server(model_folder: str, args: Any, context: int, dtype: str, trace: list[dict], folder: str):
    """``omnikv serve`` of the model folder, with OmniKV's filter layers and the command's tiers."""
    offload: dict[str, Any] = {"device": args.offload}
    if args.offload == "cpu":
        offload["host_dtype"] = args.host_dtype
    config = {
        "model": {"name_or_path": model_folder, "dtype": dtype, "device": args.device, "attn_implementation": "sdpa"},
        "omnikv": {"enabled": True, "filter_layers": FILTER_LAYERS, "wait_layers": 1, "token_budget": args.budget},
        "offload": offload,
        "prefill": {"chunk_size": args.prefill_chunk},
    }
    config_path = os.path.join(folder, "omnikv.json")
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    port = free_port()
    command = [sys.executable, "-m", "omnikv_runtime.cli", "serve", "--config", config_path, "--port", str(port)]
    command += ["--max-batch", str(args.max_batch), "--max-context", str(context)]
    command += ["--max-queue", str(max(64, len(trace))), "--prefix-cache-bytes", str(args.prefix_cache_bytes)]
    if args.max_prefill_tokens:
        command += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    return ServerProcess(command, os.path.join(args.logs or folder, "omnikv.log"), port, model_folder)


def best_attention(device: str) -> str:
    """The peer's attention: flash-attention 2 on CUDA where ``flash_attn`` imports, else sdpa (both paged under
    continuous batching)."""
    return "flash_attention_2" if device.startswith("cuda") and importlib.util.find_spec("flash_attn") else "sdpa"


def transformers_server(model_folder: str, args: Any, context: int, dtype: str, trace: list[dict], folder: str):
    """``transformers serve`` of the model folder with continuous batching; on the CPU with KV blocks for the
    whole trace at once (its default sizes the cache from a share of all the memory there is)."""
    port = free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_folder, "--continuous-batching"]
    command += ["--attn-implementation", args.attn or best_attention(args.device), "--device", args.device]
    command += ["--dtype", dtype, "--host", "127.0.0.1", "--port", str(port)]
    if args.device == "cpu":
        blocks = sum(-(-(len(e["prompt_ids"]) + e["new_tokens"]) // CPU_BLOCK_TOKENS) + 1 for e in trace)
        command += ["--cb-num-blocks", str(blocks + 8), "--cb-block-size", str(CPU_BLOCK_TOKENS)]
    command += args.peer_arg
    return ServerProcess(command, os.path.join(args.logs or folder, "transformers.log"), port, model_folder)


SERVERS = {"omnikv": omnikv_server, "transformers": transformers_server}


def peer_available() -> str | None:
    """None when ``transformers serve`` can run here, else what it lacks."""
    missing = [
        name for name in ("fastapi", "uvicorn", "openai", "pydantic", "typer") if not importlib.util.find_spec(name)
    ]
    if missing:
        return f"error: transformers serve cannot run here: {', '.join(missing)} not installed"
    return None


class PeakMemory:
    """The most memory a server takes while it runs, above what was in use before it started: on CUDA the card's
    ``memory.used`` (``nvidia-smi``, else ``torch.cuda.mem_get_info``), on the CPU the resident memory of the
    server's process and its children."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.server: ServerProcess | None = None
        self.peak = self.baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.device.type != "cuda":
            self.source = "resident memory of the server's processes (psutil)"
        elif self._nvidia_smi() is not None:
            self.source = "the card's memory.used (nvidia-smi), less what was used before the server started"
        else:
            self.source = "the card's used memory (torch.cuda.mem_get_info), less what was used before"

    def _nvidia_smi(self) -> int | None:
        index = self.device.index if self.device.index is not None else 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = int(visible.split(",")[index])
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(index)]
        try:
            return int(subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip()) * 2**20
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def used(self) -> int:
        if self.device.type == "cuda":
            smi = self._nvidia_smi() if "nvidia-smi" in self.source else None
            if smi is not None:
                return smi
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        process = self.server.process if self.server is not None else None
        if process is None:
            return 0
        try:
            parent = psutil.Process(process.pid)
            return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
        except psutil.Error:
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, self.used())

    def start(self, server: ServerProcess) -> None:
        self.server = server
        self.baseline = self.used()
        self.peak = self.baseline
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"peak_memory_mib": round((self.peak - self.baseline) / 2**20), "memory_source": self.source}
