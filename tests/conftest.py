"""Shared fixtures. Every test run gets its own shared-memory namespace and must leave
nothing behind in /dev/shm; the ``namespace`` fixture checks that."""

from __future__ import annotations

import os
import uuid

import pytest
from sse_upstream import UpstreamProcess

from shmstream.shm import segment
from shmstream.shm.store import ShmStore


def _leftovers(namespace: str) -> list[str]:
    return [e for e in os.listdir(segment.SHM_DIR)
            if e.startswith((namespace + ".", "sem." + namespace + "."))]


def _fresh_namespace(tag: str):
    name = f"t{os.getpid()}{tag}{uuid.uuid4().hex[:10]}"
    yield name
    ShmStore(name).purge()
    assert _leftovers(name) == [], "test left shared-memory objects behind"


@pytest.fixture
def namespace():
    """A fresh namespace, purged and checked empty after the test."""
    yield from _fresh_namespace("x")


@pytest.fixture
def other_namespace():
    """A second fresh namespace (e.g. a restore target), purged and checked the same way."""
    yield from _fresh_namespace("y")


@pytest.fixture(scope="session")
def upstream():
    """The scripted SSE upstream (tests/sse_upstream.py) as a real process; tests tell
    their requests apart by the script's tag."""
    with UpstreamProcess() as process:
        yield process


@pytest.fixture
def shm_store(namespace):
    return ShmStore(namespace, capacity=64 * 1024, ttl=300)


# Backends every store-contract test runs against.
BACKENDS = ["shm", "redis"]


@pytest.fixture(scope="session")
def redis_url():
    """A private ``redis-server`` on a free loopback port for the whole test session
    (persistence off). Skips when ``redis-server`` is not installed (scripts/test.sh
    installs it)."""
    from redis_server import LocalRedisServer

    if not LocalRedisServer.available():
        message = "redis-server is not installed (scripts/test.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run both backends, never skip one silently
        pytest.skip(message)
    server = LocalRedisServer()
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def redis_stores(request, namespace):
    """Make Redis stores on the test namespace: ``redis_stores(capacity=..., lease=...)``.

    At teardown every store made is closed and every key of the namespace deleted."""
    from shmstream.redis.store import RedisStore

    url = request.getfixturevalue("redis_url")
    made = []

    def make(capacity: int = 64 * 1024, ttl: float = 300, **options):
        store = RedisStore.from_url(url, namespace=namespace, capacity=capacity, ttl=ttl,
                                    **options)
        made.append(store)
        return store

    make.url = url
    make.namespace = namespace
    yield make
    for store in made:
        store.close()
    cleaner = RedisStore.from_url(url, namespace=namespace)
    cleaner.purge()
    left = list(cleaner._redis.scan_iter(match=f"shmstream:{{{namespace}}}:*"))
    cleaner.close()
    assert left == [], "test left Redis keys behind"


@pytest.fixture(params=BACKENDS)
def store_factory(request, namespace):
    """Make stores of the parametrized backend: ``store_factory(capacity=..., ttl=...)``.

    Stores made by one factory share one namespace, as separate processes would."""
    kind = request.param
    redis_make = request.getfixturevalue("redis_stores") if kind == "redis" else None

    def make(capacity: int = 64 * 1024, ttl: float = 300, **options):
        if kind == "shm":
            return ShmStore(namespace, capacity=capacity, ttl=ttl, **options)
        if kind == "redis":
            return redis_make(capacity=capacity, ttl=ttl, **options)
        raise AssertionError(kind)

    make.backend = kind
    make.namespace = namespace
    return make


@pytest.fixture
def store(store_factory):
    return store_factory()
