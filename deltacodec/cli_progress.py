"""The ``sld`` progress bar: one ``\\r``-redrawn line on stderr, shown only on a terminal.

A bar written with carriage returns into a log file or a pipe is noise (hundreds of
overwritten lines), so nothing is written unless the stream is a TTY. Short runs show nothing
either: the bar appears once work has taken ``delay`` seconds. A small bar is kept here rather
than a dependency (tqdm): it needs a dozen lines and the core package stays numpy, msgpack and
zstandard.

The command-line dispatcher calls :func:`break_line` before it prints a warning or an error,
so a message never lands in the middle of a bar.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

__all__ = ["ProgressBar", "stderr_progress", "break_line"]

#: Seconds of work before the bar first appears: a command that ends sooner shows nothing.
DEFAULT_DELAY_S = 0.5
#: Redraws per second at most: a file with 700,000 tensors must not cost 700,000 writes.
_MAX_REDRAWS_PER_S = 10
_WIDTH = 30

# The bar whose line is open (drawn, not yet ended by a newline), if any.
_open: "ProgressBar | None" = None


def break_line() -> None:
    """End the open progress line, if one is, so the next message starts on its own line."""
    global _open
    if _open is not None:
        bar, _open = _open, None
        bar.stream.write("\n")
        bar.stream.flush()


class ProgressBar:
    """``report(i, n, name)``: ``i`` of ``n`` steps done; the ``Progress`` callback of the codec.

    ``stream``: where to draw (default: ``sys.stderr`` at construction). ``enabled``: draw at
    all (default: when the stream is a TTY). ``delay``: seconds of work before the first draw
    (default :data:`DEFAULT_DELAY_S`).
    ``clock``: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        delay: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.delay = DEFAULT_DELAY_S if delay is None else delay
        self.clock = clock
        self._start: float | None = None
        self._last_draw: float | None = None

    def __call__(self, i: int, n: int, name: str = "") -> None:
        global _open
        if not self.enabled or n <= 0:
            return
        now = self.clock()
        if self._start is None:
            self._start = now
        if self._last_draw is None and now - self._start < self.delay:
            return
        final = i >= n
        if not final and self._last_draw is not None and now - self._last_draw < 1 / _MAX_REDRAWS_PER_S:
            return
        self._last_draw = now
        done = _WIDTH * min(i, n) // n
        self.stream.write(f"\r{self.label} [{'#' * done}{'.' * (_WIDTH - done)}] {i}/{n}")
        if final:
            self.stream.write("\n")
            _open = None
        else:
            _open = self
        self.stream.flush()


def stderr_progress(label: str, quiet: bool = False, **kwargs) -> ProgressBar:
    """The progress callback for a verb: a :class:`ProgressBar` on stderr, never drawn with
    ``quiet`` (``-q``) or when stderr is not a terminal. Keyword arguments go to ProgressBar."""
    if quiet:
        kwargs["enabled"] = False
    return ProgressBar(label, **kwargs)
