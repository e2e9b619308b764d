"""Progress bars on stderr for long work: prefill chunks, decode tokens, evaluation samples.

The library is silent by default; the ``omnikv`` command turns bars on (``--quiet`` keeps them
off), and a script may too::

    from omnikv_runtime import progress
    progress.enable_progress_bars()

Even when enabled, a bar is drawn only while stderr is a terminal, so logs and pipes stay clean.
Bars are tqdm's (elapsed time, rate and the estimated time left); a disabled bar is a no-op object
with the same methods, and tqdm is not imported for it.

Updating a bar reads no device value: the decode loop moves its bar only where it already meets the
host (every ``generation.check_every`` tokens), so on CUDA the bar counts steps launched.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

_state = {"enabled": False}


class Bar(Protocol):
    """What callers use of a bar (tqdm's interface)."""

    def update(self, n: float = 1) -> Any: ...

    def close(self) -> None: ...


class _SilentBar:
    """A bar that draws nothing."""

    def update(self, n: float = 1) -> None:
        return None

    def close(self) -> None:
        return None


def enable_progress_bars(enabled: bool = True) -> None:
    """Draw progress bars on stderr (when it is a terminal) from now on; ``False`` turns them off."""
    _state["enabled"] = bool(enabled)


def disable_progress_bars() -> None:
    """Draw no progress bars (the library's default)."""
    _state["enabled"] = False


def progress_bars_enabled() -> bool:
    """Whether bars are switched on (they are still drawn only on a terminal)."""
    return _state["enabled"]


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (False for a pipe, a file, or a replaced or closed stream)."""
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    position: int | None = None,
    leave: bool = False,
    enabled: bool | None = None,
) -> Bar:
    """A tqdm bar on stderr, or a silent one when bars are off or stderr is not a terminal.

    ``leave=False`` (default): the bar is erased when closed, so a command's report is what stays on
    screen. ``enabled``: this bar only, instead of the process's setting.
    """
    wanted = _state["enabled"] if enabled is None else enabled
    if not (wanted and stderr_is_terminal()):
        return _SilentBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        position=position,
        leave=leave,
        file=sys.stderr,
        dynamic_ncols=True,
        unit_scale=False,
    )


def finish(bar: Bar, count: int) -> None:
    """Close ``bar`` at ``count`` of ``count``: work that ended before its total (a decode that met an
    end-of-sequence token) closes at what it produced, not at the count where it stopped."""
    if hasattr(bar, "total"):  # a tqdm bar (a silent one has nothing to show)
        bar.total = bar.n = count
        bar.refresh()
    bar.close()
