"""``shmstream tail``: follow a session's bytes as they arrive, like ``tail -f``.

It starts at the session's end by default (``--from 0`` replays from the start) and reads
through the store interface, so it works on every backend.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import BinaryIO

from shmstream.cli.text import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ToolError, isatty, say
from shmstream.store.errors import OffsetLost
from shmstream.store.interface import Session

# --- tail ---------------------------------------------------------------------------------


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the reader loop checks (a blocked futex wait returns
    on the signal), so the reader leaves its waiter count and lock consistent."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def is_set(self) -> bool:
        return self.received is not None

    def __enter__(self) -> _StopSignals:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def tail(args) -> int:
    if args.from_offset is not None and args.from_offset < 0:
        raise ToolError(f"--from must be a non-negative offset, not {args.from_offset}",
                        EXIT_USAGE)
    from shmstream.cli.tools import _get, _store  # the shared store opening of the tools

    store = _store(args)
    session = _get(store, args.id)
    try:
        with _StopSignals() as stop:
            offset = _follow(session, args.from_offset, stop.is_set, sys.stdout.buffer)
            if stop.is_set():
                return EXIT_INTERRUPTED
        if isatty(sys.stderr):
            say(f"-- session ended: {session.info().state.label} at offset {offset}")
        return EXIT_OK
    finally:
        session.close()


def _follow(session: Session, start: int | None, should_stop: Callable[[], bool],
            out: BinaryIO) -> int:
    """Copy the session's bytes from ``start`` (None: its end, as ``tail -f`` starts) to
    ``out`` as they arrive, until it ends or ``should_stop()``; return the offset reached.

    Raises :class:`ToolError` when the bytes at the offset are gone: asked for with
    ``start``, or dropped by a producer that lapped this reader.
    """
    offset = session.info().total_bytes if start is None else start
    try:
        for chunk in session.read(offset, should_stop=should_stop):
            out.write(chunk)
            out.flush()
            offset += len(chunk)
        return offset
    except OffsetLost:
        pass
    dropped = session.info().dropped_bytes
    raise ToolError(f"offset {offset} is no longer held (the oldest held byte is {dropped})")
