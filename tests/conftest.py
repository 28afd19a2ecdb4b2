"""Shared fixtures. Every test run gets its own shared-memory namespace and must leave
nothing behind in /dev/shm; the ``namespace`` fixture checks that."""

from __future__ import annotations

import os
import uuid

import pytest

from shmstream import segment
from shmstream.registry import ShmStore


def _leftovers(namespace: str) -> list[str]:
    return [e for e in os.listdir(segment.SHM_DIR)
            if e.startswith((namespace + ".", "sem." + namespace + "."))]


@pytest.fixture
def namespace():
    """A fresh namespace, purged and checked empty after the test."""
    name = f"t{os.getpid()}x{uuid.uuid4().hex[:10]}"
    yield name
    ShmStore(name).purge()
    assert _leftovers(name) == [], "test left shared-memory objects behind"


@pytest.fixture
def shm_store(namespace):
    return ShmStore(namespace, capacity=64 * 1024, ttl=300)
