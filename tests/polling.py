"""Waiting for a condition in tests: bounded, so a bug fails instead of hanging."""

from __future__ import annotations

import time


def _poll(predicate, timeout: float, interval: float):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Whether ``predicate()`` turned true within ``timeout`` seconds."""
    return bool(_poll(predicate, timeout, interval))


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.005):
    """The first true value of ``predicate()``; AssertionError after ``timeout`` seconds."""
    value = _poll(predicate, timeout, interval)
    if not value:
        raise AssertionError("condition not met in time")
    return value
