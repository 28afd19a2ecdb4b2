"""Crash points: named steps of multi-step store operations where a test can kill the
process, to prove that a crash between any two steps leaves a recoverable store.

Production never sets :data:`hook`; each crash point costs one global load and a test of
None. Tests set it (in a forked child) to a function of the point's name, typically one
that SIGKILLs the process at the n-th point reached (tests/test_shm_crash.py).
"""

from __future__ import annotations

from collections.abc import Callable

hook: Callable[[str], None] | None = None
