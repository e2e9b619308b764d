"""Run an unmodified script with the OmniKV runtime: ``omnikv run [--config C] script.py [args...]``.

Like ``deepspeed script.py`` or ``accelerate launch``: the script runs as ``python script.py`` would
(``__main__``, its own ``sys.argv``, its folder first on ``sys.path``), while
``PreTrainedModel.from_pretrained`` (which ``AutoModelForCausalLM`` and every model class go
through) is patched so that each causal LM of a supported family gets an :class:`Engine`: its
attention becomes OmniKV's (the base implementation whenever no OmniKV cache is passed, so training
and scoring forwards are unchanged) and its ``generate`` gets an OmniKV cache (OmniKV: Hao et al.,
"Dynamic Context Selection for Efficient Long-Context LLMs", ICLR 2025). A model the runtime cannot
take (another architecture, or one the config's layer plan does not fit) is left alone with one
warning, or stops the run with ``strict``. Exit code, output, exceptions and logging setup of the
script pass through; the launcher adds no arguments that transformers would warn about.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from omnikv_runtime.config import OmniKVConfig, load_config
from omnikv_runtime.decode.loop import loop_settings
from omnikv_runtime.engine import SUPPORTED_MODEL_TYPES, Engine
from omnikv_runtime.engine.arguments import as_token_count
from omnikv_runtime.errors import ConfigError, OmniKVError, PromptError, UnsupportedModelError

logger = logging.getLogger(__name__)

STATS_ENV = "OMNIKV_RUN_STATS"  # write what each wrapped model's generate did to this JSON file
_UNSUPPORTED_GENERATE = ("assistant_model", "penalty_alpha", "prompt_lookup_num_tokens")
_LOOP_OWN = ("input_ids", "inputs", "attention_mask", "max_new_tokens", "max_length")  # passed separately


class StrictRunError(OmniKVError, RuntimeError):
    """``omnikv run --strict``: the script loaded a model the runtime cannot take."""


def _max_new_tokens(model: PreTrainedModel, kwargs: dict[str, Any], prompt: int) -> Any:
    """What ``generate`` will produce at most, as the script asked it (the engine checks the value)."""
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens")
    new = getattr(config, "max_new_tokens", None) if new is None else new
    if new is not None:
        return new
    max_length = kwargs.get("max_length")
    max_length = getattr(config, "max_length", None) if max_length is None else max_length
    return max(int(max_length if max_length is not None else 20) - prompt, 1)


class WrappedModel:
    """One model the launcher gave the runtime, and what its ``generate`` calls did."""

    def __init__(self, model: PreTrainedModel, engine: Engine) -> None:
        self.model = model
        self.engine = engine
        self.calls: list[dict[str, Any]] = []
        self._original = model.generate

        @functools.wraps(self._original.__func__)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self.generate(*args, **kwargs)

        model.generate = generate

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``engine.generate`` (the engine's decode loop) when it runs the script's settings; else the
        model's own ``generate`` with an OmniKV cache passed in (unless the caller passed a cache)."""
        inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        passes_cache = any(kwargs.get(key) is not None for key in ("past_key_values", "cache"))
        unsupported = [key for key in _UNSUPPORTED_GENERATE if kwargs.get(key) is not None]
        if unsupported:
            logger.warning("generate(%s) runs without OmniKV (the tiered cache cannot be cropped)", unsupported)
        if passes_cache or unsupported or kwargs.get("use_cache") is False or not _is_ids(inputs):
            return self._original(*args, **kwargs)
        engine = self.engine
        prompt = inputs.shape[1]
        try:
            new_tokens = as_token_count("max_new_tokens", _max_new_tokens(self.model, kwargs, prompt))
        except (PromptError, TypeError, ValueError):
            new_tokens = 0
        if new_tokens < 1:  # transformers reports a bad length to the script as it would without the runtime
            return self._original(*args, **kwargs)
        if len(args) <= 1:  # the engine's own decode loop (a CUDA graph on CUDA) when it runs these settings
            loop_kwargs = {key: value for key, value in kwargs.items() if key not in _LOOP_OWN}
            config = kwargs.get("generation_config") or self.model.generation_config
            loop_kwargs.setdefault("do_sample", bool(getattr(config, "do_sample", False)))
            if not isinstance(loop_settings(self.model, engine.tokenizer, dict(loop_kwargs)), str):
                mask = kwargs.get("attention_mask")
                output = engine.generate(inputs, attention_mask=mask, max_new_tokens=new_tokens, **loop_kwargs)
                self.calls.append(engine.stats())
                return output
        # transformers' generate as the script called it, through a fresh OmniKV cache
        output = engine.generate_stepwise(self._original, inputs, new_tokens, args, kwargs)
        self.calls.append(engine.stats())
        return output

    def report(self) -> dict[str, Any]:
        return {
            "class": type(self.model).__name__,
            "model_type": self.model.config.model_type,
            "omnikv": self.engine.config.omnikv.enabled,
            "plan": self.engine.plan.describe(),
            "generate_calls": self.calls,
        }


def _is_ids(inputs: Any) -> bool:
    return torch.is_tensor(inputs) and inputs.dim() == 2 and not inputs.is_floating_point()


class Launcher:
    """Gives every causal LM a script loads the runtime; runs the script.

    Args:
        config: the runtime config (path, bundled name, dict or OmniKVConfig); its ``model``
            section is not used here: the script loads its own models (``omnikv run`` sets the CPU
            threads from ``model.cpu_num_threads`` before the script starts).
        stats_path: write the wrapped models' generate stats here as JSON when the script ends
            (default: ``$OMNIKV_RUN_STATS``, if set).
        profile_dir: profile memory over the whole script and write the report there.
        strict: a model the runtime cannot take stops the script (StrictRunError) instead of
            running without OmniKV after a warning.
    """

    def __init__(
        self,
        config: str | Path | dict[str, Any] | OmniKVConfig | None = None,
        stats_path: str | Path | None = None,
        profile_dir: str | Path | None = None,
        strict: bool = False,
    ) -> None:
        self.config = load_config(config)
        self.strict = strict
        self.stats_path = stats_path or os.environ.get(STATS_ENV) or None
        self.profile_dir = profile_dir
        self.wrapped: list[WrappedModel] = []
        self.skipped: list[dict[str, str]] = []
        self.profiler: Any = None
        self._depth = 0

    def attach(self, model: Any) -> Engine | None:
        """Give ``model`` the runtime if it is a causal LM of a supported family; returns its engine."""
        if not isinstance(model, PreTrainedModel) or not model.can_generate():
            return None  # a base model, an encoder, a head without generate: nothing to do
        model_type = getattr(model.config, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            return self._skip(model, f"model type '{model_type}' is not supported ({', '.join(SUPPORTED_MODEL_TYPES)})")
        try:
            engine = Engine(model, self.config.model_copy(deep=True))
        except (ConfigError, UnsupportedModelError, PromptError) as exc:  # e.g. filter layers past its last layer
            return self._skip(model, str(exc))
        self.wrapped.append(WrappedModel(model, engine))
        if self.profiler is not None:
            self.profiler.watch(engine)
        logger.info("omnikv run: %s runs generate through OmniKV (%s)", type(model).__name__, engine.plan.describe())
        return engine

    def _skip(self, model: PreTrainedModel, reason: str) -> None:
        """Leave ``model`` as it is, with one warning (``strict``: raise StrictRunError)."""
        name = type(model).__name__
        if self.strict:
            raise StrictRunError(f"{name} cannot run with OmniKV: {reason} (without --strict it would run as it is)")
        logger.warning("omnikv run: %s runs without OmniKV: %s", name, reason)
        self.skipped.append({"class": name, "model_type": getattr(model.config, "model_type", ""), "reason": reason})
        return None

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Patch ``PreTrainedModel.from_pretrained`` so loaded causal LMs get the runtime."""
        original = PreTrainedModel.__dict__["from_pretrained"]
        launcher = self

        def from_pretrained(cls, *args, **kwargs):
            launcher._depth += 1
            try:
                model = original.__func__(cls, *args, **kwargs)
            finally:
                launcher._depth -= 1
            if launcher._depth == 0:
                launcher.attach(model)
            return model

        PreTrainedModel.from_pretrained = classmethod(functools.wraps(original.__func__)(from_pretrained))
        try:
            yield
        finally:
            PreTrainedModel.from_pretrained = original

    def run(self, script: str | Path, argv: list[str]) -> int:
        """Run ``script`` with ``argv`` as ``python script argv...`` would; returns its exit code."""
        path = Path(script)
        if not path.is_file():
            print(f"omnikv run: can't open file {str(script)!r}: no such file", file=sys.stderr)
            return 2
        saved_argv, saved_path = sys.argv, list(sys.path)
        sys.argv = [str(script), *argv]
        sys.path.insert(0, str(path.resolve().parent))
        profiling = self._start_profiler()
        try:
            with self.patched():
                runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except KeyboardInterrupt:
            raise
        except StrictRunError as exc:
            print(f"omnikv run: error: {exc}", file=sys.stderr)
            code = 2
        except BaseException:  # noqa: BLE001 - reported like the interpreter does, exit code 1
            kind, value, trace = sys.exc_info()
            trace = _script_frames(trace, path)
            sys.excepthook(kind, value.with_traceback(trace), trace)
            code = 1
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
            if profiling is not None:
                profiling.__exit__(None, None, None)
            self._write_stats()
        return code

    def _start_profiler(self) -> Any:
        if not self.profile_dir:
            return None
        from omnikv_runtime.profiling import profile_memory

        context = profile_memory(None, out_dir=self.profile_dir, config=self.config.profiling)
        self.profiler = context.__enter__()
        return context

    def report(self) -> dict[str, Any]:
        return {"models": [wrapped.report() for wrapped in self.wrapped], "unsupported": self.skipped}

    def _write_stats(self) -> None:
        if self.stats_path:
            Path(self.stats_path).write_text(json.dumps(self.report(), indent=2, default=str), encoding="utf-8")


def _exit_code(code: Any) -> int:
    """``sys.exit(code)`` as the interpreter maps it: None is 0, an int itself, anything else printed, 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _script_frames(trace: Any, path: Path) -> Any:
    """The traceback from the script's first frame on (the launcher's and runpy's frames dropped)."""
    target = str(path.resolve())
    current = trace
    while current is not None:
        if str(Path(current.tb_frame.f_code.co_filename).resolve()) == target:
            return current
        current = current.tb_next
    return trace
