"""Session states: ``running`` moves once to one terminal state."""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    """Session states. ``RUNNING`` moves once to one of the terminal states."""

    RUNNING = 0
    DONE = 1
    CANCELLED = 2
    FAILED = 3
    ABORTED = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def is_terminal(self) -> bool:
        return self is not State.RUNNING
