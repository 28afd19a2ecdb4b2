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


# Backends every store-contract test runs against. The Redis backend adds "redis" here.
BACKENDS = ["shm"]


@pytest.fixture(params=BACKENDS)
def store_factory(request, namespace):
    """Make stores of the parametrized backend: ``store_factory(capacity=..., ttl=...)``.

    Stores made by one factory share one namespace, as separate processes would."""
    kind = request.param

    def make(capacity: int = 64 * 1024, ttl: float = 300, **options):
        if kind == "shm":
            return ShmStore(namespace, capacity=capacity, ttl=ttl, **options)
        raise AssertionError(kind)

    make.backend = kind
    make.namespace = namespace
    return make


@pytest.fixture
def store(store_factory):
    return store_factory()
