"""Text for the operator's terminal: escaped ids, sizes, durations, a progress line, and
the one-line error every tool ends with (:class:`ToolError`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

ID_COLUMN_WIDTH = 40
PROGRESS_DELAY = 0.5  # seconds before a progress line appears (quick operations show none)


class ToolError(Exception):
    """A failure to report as one line on stderr, ending the command with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


# --- text for humans ----------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """``text`` safe for a terminal: backslash escapes for every non-printable character
    (controls, bidi overrides, separators other than the space) and for the backslash."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the cut marked by ``...``."""
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def show_id(conversation_id: str, width: int | None = ID_COLUMN_WIDTH) -> str:
    shown = escape(conversation_id)
    return shown if width is None else shorten(shown, width)


def format_size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``12s``, ``3m05s``, ``2h03m``, ``4d07h``; negative (clock steps) shows as ``0s``."""
    whole = max(int(seconds), 0)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A one-line, carriage-return progress report on a terminal, for long transfers.

    Silent unless ``stream`` is a terminal, and until the operation has run for ``delay``
    seconds, so quick ones and pipelines print nothing. Redraws at most every ``interval``.
    """

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool | None = None,
                 delay: float | None = None, interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = isatty(self.stream) if enabled is None else enabled
        self.delay = PROGRESS_DELAY if delay is None else delay
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.label = ""
        self.total = 0
        self.shown = False
        self._drawn_at = float("-inf")
        self._width = 0

    def phase(self, label: str, total: int) -> None:
        """Start counting ``total`` bytes of a step called ``label`` (same line)."""
        self.label = label
        self.total = total
        self.update(0)

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and (now - self.started < self.delay or now - self._drawn_at < self.interval):
            return
        percent = 100 * done // self.total if self.total else 100
        line = f"{self.label}: {format_size(done)} / {format_size(self.total)} ({percent}%)"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(line))
        self._drawn_at = now
        self.shown = True

    def finish(self, done: int | None = None) -> None:
        """Draw the final count and end the line, if anything was drawn."""
        if self.shown:
            self.update(self.total if done is None else done, force=True)
            self.stream.write("\n")
            self.stream.flush()


def isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
