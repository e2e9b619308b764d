"""The engine's own generation loop: chunked prefill, then one static decode step per token.

In the style of gpt-fast: the step (the model's forward over one token per row through the
OmniKV cache, the choice of the next token, and the bookkeeping of finished rows) reads and
writes only tensors allocated before it, so on CUDA it is captured once in a CUDA graph and
replayed for every token. Host and GPU meet only every ``check_every`` tokens, to see whether all
rows have finished (end-of-sequence tokens on the device; stop strings decoded on the host).

Rows that finish keep running with the pad token, as transformers does, and the output is cut
where the last row finished.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv_runtime import progress
from omnikv_runtime.cache.adapter import OmniKVCache
from omnikv_runtime.decode.graph import CudaGraphRecorder, EagerRecorder, GraphedStep
from omnikv_runtime.decode.sampling import SamplingSettings, choose_tokens

logger = logging.getLogger(__name__)

EAGER_STEPS_BEFORE_CAPTURE = 2  # real steps run eagerly first (warm-up: kernels compiled, buffers sized)

# generate() arguments the loop runs (others go to transformers' generate, step by step)
LOOP_ARGUMENTS = {
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "stop_strings",
    "tokenizer",
    "use_cache",
    "prefill_chunk_size",
    "generation_config",
    "num_beams",
    "num_return_sequences",
    "return_dict_in_generate",
}
# generation-config fields that add a logits processor, with the value that adds none
_PROCESSOR_FIELDS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_new_tokens": 0,
    "min_length": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "renormalize_logits": False,
    "exponential_decay_length_penalty": None,
    "watermarking_config": None,
}


@dataclass
class StopSettings:
    """When a row stops: an end-of-sequence token, or a stop string in its decoded text."""

    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    stop_strings: list[str] = field(default_factory=list)
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer= or initialize the engine with one")


def value_is_false(value: Any) -> bool:
    return isinstance(value, bool) and not value


def loop_settings(
    model: torch.nn.Module, tokenizer: Any, kwargs: dict[str, Any]
) -> tuple[SamplingSettings, StopSettings] | str:
    """What the loop needs from ``generate`` arguments, or why the loop cannot run them."""
    known = LOOP_ARGUMENTS | set(_PROCESSOR_FIELDS)  # a processor field passed at its neutral value is fine
    unknown = sorted(key for key, value in kwargs.items() if value is not None and key not in known)
    unknown = [key for key in unknown if not (key.startswith("output_") and value_is_false(kwargs[key]))]
    if unknown:
        return f"arguments the decode loop does not run: {', '.join(unknown)}"
    config = kwargs.get("generation_config") or model.generation_config

    def value(name: str, default: Any = None) -> Any:
        given = kwargs.get(name)
        given = getattr(config, name, None) if given is None else given
        return default if given is None else given

    if value("num_beams", 1) > 1:
        return "beam search (num_beams > 1)"
    if value("num_return_sequences", 1) > 1:
        return "num_return_sequences > 1"
    if value("return_dict_in_generate", False):
        return "return_dict_in_generate"
    for name, neutral in _PROCESSOR_FIELDS.items():
        if value(name, neutral) not in (neutral, None, []):
            return f"a logits processor ({name}={value(name)!r})"
    eos = value("eos_token_id", [])
    eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = value("pad_token_id", eos[0] if eos else 0)
    stop_strings = value("stop_strings", [])
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    try:
        sampling = SamplingSettings.from_generation(config, kwargs)
        stop = StopSettings(eos, int(pad), stop_strings, kwargs.get("tokenizer") or tokenizer)
    except ValueError as exc:
        raise ValueError(f"generate: {exc}") from None
    return sampling, stop


@functools.cache
def _takes_cache_position(forward: Any) -> bool:
    return "cache_position" in inspect.signature(forward).parameters


def cached_forward(
    model: torch.nn.Module,
    cache: OmniKVCache,
    cache_keyword: str,
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache_position: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 1,
) -> Any:
    """The model's forward over ``ids`` through ``cache``, keeping only the last position's logits
    (``cache_position`` is passed to models whose forward takes it; ``logits_to_keep`` as a tensor: the
    positions whose logits are kept).

    No autograd graph is built, whatever the caller's grad mode: a graph would keep every weight
    the step used alive until the logits go, and under ZeRO-Inference that is every layer's fetched
    weights on the GPU at once.
    """
    kwargs: dict[str, Any] = {cache_keyword: cache}
    if _takes_cache_position(type(model).forward):
        kwargs["cache_position"] = cache_position
    with torch.no_grad():
        return model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


@dataclass
class LoopTimes:
    """Wall seconds of the phases of one generation (synchronised at their ends)."""

    prefill: float = 0.0
    capture: float = 0.0
    decode: float = 0.0
    decode_steps: int = 0
    graph: bool = False


class DecodeLoop:
    """Generates for one batch through one cache: :meth:`prefill`, then :meth:`decode`.

    Args:
        model: the causal LM (its attention is OmniKV's).
        cache: a fresh OmniKV cache with room reserved for prompt + new tokens.
        cache_keyword: ``"cache"`` or ``"past_key_values"`` (the model's forward argument).
        sampling, stop: how tokens are chosen and when rows finish.
        max_new_tokens: tokens to generate at most.
        use_graph: record the step in a CUDA graph (CUDA only).
        check_every: tokens between the host's checks for finished rows.
        token_capacity: room for new tokens in the output buffer (default ``max_new_tokens``); a
            loop kept for reuse (:meth:`renew`) serves later calls of up to this many tokens.
        recorder: how steps are recorded (default: a CUDA graph recorder when ``use_graph``; an
            :class:`~omnikv_runtime.decode.graph.EagerRecorder` runs the recording path on a CPU).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: OmniKVCache,
        cache_keyword: str,
        sampling: SamplingSettings,
        stop: StopSettings,
        max_new_tokens: int,
        use_graph: bool,
        check_every: int = 16,
        token_capacity: int | None = None,
        recorder: CudaGraphRecorder | EagerRecorder | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.cache_keyword = cache_keyword
        self.sampling = sampling
        self.stop = stop
        self.max_new_tokens = max_new_tokens
        self.use_graph = use_graph
        self.check_every = check_every
        self.times = LoopTimes(graph=use_graph)
        self._stopped_at: dict[int, int] = {}  # row -> tokens kept, for rows a stop string ended
        self._stop_checked = 0  # new tokens already searched for stop strings
        if recorder is None and use_graph:
            recorder = CudaGraphRecorder(torch.device("cuda", torch.cuda.current_device()))
        self.use_graph = self.times.graph = recorder is not None
        self.steps = GraphedStep(recorder, cache.tiers.transfer, warmup=EAGER_STEPS_BEFORE_CAPTURE, max_graphs=1)
        self._recorded_before = 0.0  # recording seconds of earlier calls served by this loop
        self._steps_run = 0
        self.token_capacity = max(token_capacity or max_new_tokens, max_new_tokens)
        self.key: tuple | None = None  # what a reusing call must match (set by the engine)

    @property
    def captured(self) -> bool:
        return bool(self.steps.kept())

    def run_eagerly(self) -> None:
        """Record nothing: every step runs eagerly (a host tier the GPU cannot read alone)."""
        self.use_graph = self.times.graph = False
        self.steps.recorder = None

    def renew(self, max_new_tokens: int, stop: StopSettings) -> None:
        """Serve another request with the same captured step (the engine has reset the cache)."""
        if max_new_tokens > self.token_capacity:
            raise ValueError(f"this loop holds {self.token_capacity} new tokens, {max_new_tokens} asked for")
        self.max_new_tokens, self.stop = max_new_tokens, stop
        self.times = LoopTimes(graph=self.use_graph)
        self._recorded_before = self.steps.times.recording
        self._stopped_at = {}
        self._stop_checked = 0
        self._steps_run = 0

    # prefill ----------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int | None) -> None:
        """Run the prompt through the cache (in chunks) and emit the first new token."""
        started = time.perf_counter()
        batch, length = input_ids.shape
        device = input_ids.device
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        self._allocate(batch, device, positions[:, -1:] + 1, length)
        chunk = chunk_size or length
        bar = progress.bar(length, "prefill", unit="tok")
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            output = self._forward(
                input_ids[:, start:end],
                positions[:, start:end],
                attention_mask[:, :end],
                torch.arange(start, end, device=device),
            )
            bar.update(end - start)  # the chunk's forward has been launched (no synchronisation added)
        bar.close()
        self._emit(output.logits[:, -1])
        if self.max_new_tokens > 1:
            self.cache.start_decoding(self.ids)  # so that even the first step may be a replay
        self._synchronize()
        self.times.prefill = time.perf_counter() - started

    def start_after_fill(self, batch: int, device: torch.device, next_token: int = 5) -> None:
        """Decode from a cache filled without the model (benchmarks): the step's token is
        ``next_token`` in every row, at the column after the cache's last."""
        length = self.cache.get_seq_length()
        self._allocate(batch, device, torch.full((batch, 1), length, dtype=torch.long, device=device), length)
        self.ids.fill_(next_token)
        self.cache.start_decoding(self.ids)  # no prefill forward marked the prompt's columns: every one is real

    def _allocate(self, batch: int, device: torch.device, next_positions: torch.Tensor, length: int) -> None:
        """The step's static inputs and outputs (allocated once; a renewed loop refills them in place)."""
        if getattr(self, "ids", None) is None or self.ids.shape[0] != batch:
            self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
            self.mask = torch.ones(batch, 1, 1, 1, dtype=torch.bool, device=device)  # 4-D: transformers builds none
            self.tokens = torch.empty(batch, self.token_capacity, dtype=torch.long, device=device)
            self.step = torch.zeros(1, dtype=torch.long, device=device)
            self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
            self.eos = torch.tensor(self.stop.eos_token_ids or [-1], dtype=torch.long, device=device)
        self.positions.copy_(next_positions)
        self.cache_position.fill_(length)
        self.tokens.fill_(self.stop.pad_token_id)
        self.step.zero_()
        self.finished.zero_()

    def _forward(self, ids, positions, mask, cache_position):
        return cached_forward(self.model, self.cache, self.cache_keyword, ids, positions, mask, cache_position)

    def _emit(self, logits: torch.Tensor) -> None:
        """Choose each row's next token and record it (device ops only: part of the captured step)."""
        chosen = choose_tokens(logits, self.sampling)
        chosen = torch.where(self.finished, self.stop.pad_token_id, chosen)
        self.tokens.index_copy_(1, self.step, chosen[:, None])
        self.finished |= (chosen[:, None] == self.eos[None, :]).any(dim=-1)
        self.ids.copy_(chosen[:, None])
        self.step.add_(1)

    # decode -----------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        output = self._forward(self.ids, self.positions, self.mask, self.cache_position)
        self._emit(output.logits[:, -1])
        self.positions.add_(1)
        self.cache_position.add_(1)

    def decode(self) -> torch.Tensor:
        """Generate the remaining tokens; returns the new tokens ``[batch, n]`` (n <= max_new_tokens)."""
        started = time.perf_counter()
        emitted, done = 1, self._check(1)
        bar = progress.bar(self.max_new_tokens, "decode", unit="tok", initial=1)
        # the bar moves where the loop meets the host anyway (no synchronisation of its own); on the
        # CPU there is nothing to wait for, so it moves every token
        each_token = not self.ids.is_cuda
        while emitted < self.max_new_tokens and not done:
            run = min(self.check_every, self.max_new_tokens - emitted)
            for _ in range(run):
                self.run_step()
                if each_token:
                    bar.update(1)
            emitted += run
            done = self._check(emitted)
            if not each_token:
                bar.update(run)
        self._synchronize()
        self.times.decode = time.perf_counter() - started - self.times.capture
        self.times.decode_steps = emitted - 1
        tokens = self._finish(emitted)
        progress.finish(bar, tokens.shape[1])  # at the tokens kept, not the steps run past the end
        return tokens

    def run_step(self) -> None:
        """One decode step: eager, or (after the warm-up steps) a replay of the recorded one."""
        self._steps_run += 1
        if self.steps.enabled and not self.steps.kept():  # every buffer any later step touches, allocated now
            self.cache.ensure_room(self.ids, max(self.token_capacity - self._steps_run, 1))
        ran = self.steps.run(self.cache.tiers.generation, self._decode_step, self._selection_widths)
        if ran is not None:  # a replay: the host-side counts the step's Python would have made
            self.cache.advance_host(1)
            self.cache.selected_log[-1].update(ran.info)
        self.times.capture = self.steps.times.recording - self._recorded_before

    def _selection_widths(self) -> dict[int, int]:
        """Filter layer -> tokens it selects in the recorded step."""
        segments = self.cache.tiers.segments
        return {s.filter_layer: s.selection.shape[1] for s in segments if s.selection is not None}

    def _check(self, emitted: int) -> bool:
        """Whether every row has finished (one host synchronisation)."""
        if self.stop.stop_strings:
            self._apply_stop_strings(emitted)
        if not (self.stop.eos_token_ids or self.stop.stop_strings):
            return False
        return bool(self.finished.all())

    def _apply_stop_strings(self, emitted: int) -> None:
        """Finish rows whose text now holds a stop string (decoded on the host, new tokens only)."""
        tokens = self.tokens[:, :emitted].tolist()
        finished = self.finished.tolist()
        reach = max(len(text) for text in self.stop.stop_strings) + 8  # tokens a stop string can span
        first = self._stop_checked + 1
        self._stop_checked = emitted
        for row, ids in enumerate(tokens):
            if finished[row]:
                continue
            for end in range(first, emitted + 1):
                text = self.stop.tokenizer.decode(ids[max(0, end - reach) : end])
                if any(stop in text for stop in self.stop.stop_strings):
                    self.tokens[row, end:emitted] = self.stop.pad_token_id
                    self.finished[row] = True
                    self._stopped_at[row] = end
                    break

    def _finish(self, emitted: int) -> torch.Tensor:
        """The new tokens, cut after the step where the last row finished."""
        tokens = self.tokens[:, :emitted]
        if emitted and bool(self.finished.all()):
            eos = set(self.stop.eos_token_ids)
            ends = []
            for row, ids in enumerate(tokens.tolist()):
                at_eos = next((i + 1 for i, token in enumerate(ids) if token in eos), emitted)
                ends.append(min(at_eos, self._stopped_at.get(row, emitted)))
            tokens = tokens[:, : max(ends)]
        return tokens

    def _synchronize(self) -> None:
        if self.ids.is_cuda:
            torch.cuda.synchronize(self.ids.device)
