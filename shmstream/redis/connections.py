"""Connections to Redis: the client's settings, the hot path, and what an outage looks like.

- :func:`client_for_url` makes the client every store call goes through, with timeouts and
  a short retry policy, so that a Redis that is down answers within a fraction of a second.
- :class:`HotPath` runs the two calls on the streaming path (append and fetch) over a bare
  per-thread connection.
- :func:`store_call` turns every failure to reach Redis into
  :class:`~shmstream.store.errors.StoreUnavailable` (a 503 ``unavailable_error``), and
  :class:`Health` logs one line when Redis goes away and one when it is back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import weakref

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from shmstream.redis import _redis_internals
from shmstream.store.errors import StoreUnavailable

log = logging.getLogger("shmstream.redis")

# A command that fails to connect is retried twice within ~0.1 s (a restart's reset
# connections), then fails: redis-py 8's default (10 retries up to 1 s apart) held every
# request for seconds while Redis was down.
CONNECT_TIMEOUT = 2.0  # seconds; a host that drops packets fails instead of hanging
SOCKET_TIMEOUT = 10.0  # seconds for any reply (a 4 MiB replay takes a few ms)
RETRIES = 2

# Replies that mean "Redis cannot serve this now", not "this request is wrong": redis-py
# maps some to classes (OOM: maxmemory reached, READONLY: a replica after a failover), the
# others arrive as a ResponseError starting with their code.
_UNAVAILABLE_CLASSES = tuple(
    cls for cls in (getattr(redis.exceptions, name, None)
                    for name in ("OutOfMemoryError", "ReadOnlyError", "TryAgainError"))
    if cls is not None
)
_UNAVAILABLE_REPLIES = ("OOM", "MISCONF", "READONLY", "MASTERDOWN", "LOADING", "CLUSTERDOWN",
                        "NOREPLICAS", "TRYAGAIN")


def client_for_url(url: str) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``) that returns bytes.

    RESP2 unless the URL asks for ``protocol=3`` (measured here, redis-py 8's RESP3 path adds
    about 40 µs to every command); timeouts in the URL's query win over the defaults above.
    """
    options = {
        "decode_responses": False,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.05), RETRIES),
    }
    if "protocol=" not in url:
        options["protocol"] = 2
    return redis.Redis.from_url(url, **options)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot be reached or cannot serve now."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, *_UNAVAILABLE_CLASSES)):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)


class Health:
    """Whether the last store call reached Redis; logs each change once (down, back).

    One per process and Redis (:meth:`for_process`): every store, session and the pub/sub
    listener of a process share it, so a process logs one line when Redis goes away and
    one when it is back, however many objects notice. The lines are the process's only
    report of the outage: the :class:`StoreUnavailable` raised say so (``logged``)."""

    # Weak: the state lives as long as something of the process uses it (a store holds it),
    # so a Redis that a later store in the same process reaches again starts afresh.
    _shared: weakref.WeakValueDictionary[tuple[int, str], Health] = \
        weakref.WeakValueDictionary()
    _shared_lock = threading.Lock()

    def __init__(self, where: str):
        self.where = where
        self.down = False
        self._since = 0.0
        self._lock = threading.Lock()

    @classmethod
    def for_process(cls, where: str) -> Health:
        """This process's Health for Redis at ``where`` (a forked child gets its own)."""
        key = (os.getpid(), where)
        with cls._shared_lock:
            health = cls._shared.get(key)
            if health is None:
                health = cls._shared[key] = cls(where)
            return health

    def failed(self, exc: BaseException) -> StoreUnavailable:
        with self._lock:
            changed, self.down = not self.down, True
            if changed:
                self._since = time.monotonic()
        if changed:
            log.error("redis at %s is unavailable (%s): session store unavailable, its "
                      "calls answer 503 until it is back", self.where, exc)
        error = StoreUnavailable(f"session store unavailable: Redis at {self.where}: {exc}")
        error.logged = True
        return error

    def succeeded(self) -> None:
        with self._lock:
            changed, self.down = self.down, False
        if changed:
            log.warning("redis at %s is reachable again after %.1f s: session store "
                        "available again", self.where, time.monotonic() - self._since)


def store_call(method):
    """Decorate a method of an object with a ``_health`` (:class:`Health`): Redis failures
    become :class:`StoreUnavailable`; other exceptions pass unchanged."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            result = method(self, *args, **kwargs)
        except redis.RedisError as exc:
            if is_unavailable(exc):
                raise self._health.failed(exc) from None
            raise
        if self._health.down:
            self._health.succeeded()
        return result

    return call


class HotPath:
    """Per-thread bare connections for the two calls on the streaming path: append and fetch.

    Measured on loopback with redis-py 8.1: one EVALSHA through ``Redis``/``Script`` costs
    63-74 µs, the same command on a bare :class:`redis.Connection` 28 µs. The client's pool
    checkout (which polls the socket), retry wrapper and metrics recorders cost more than
    the round trip. Everything else goes through the ordinary client.

    A call that fails on the connection is retried once only when ``idempotent``: an append
    whose reply was lost may have happened, and appending it again would corrupt offsets.
    So that this stays rare, a connection idle for ``IDLE_CHECK`` seconds is first checked
    for a close by the server (idle timeout, restart), as redis-py's pool does at checkout.
    """

    IDLE_CHECK = 1.0

    READ_SIZE = 1 << 20  # redis-py reads 64 KiB per recv by default: slow for a 4 MiB replay

    def __init__(self, pool: redis.ConnectionPool):
        self._pool = pool
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet = weakref.WeakSet()

    def _connection(self):
        local = self._local
        conn = getattr(local, "conn", None)
        now = time.monotonic()
        if conn is None or local.pid != os.getpid():  # a forked child never shares a socket
            conn = _redis_internals.bare_connection(self._pool,
                                                    socket_read_size=self.READ_SIZE)
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._connections.add(conn)
        elif now - local.used > self.IDLE_CHECK and _redis_internals.is_connected(conn):
            try:
                stale = conn.can_read(timeout=0)  # EOF, or bytes nobody asked for
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                conn.disconnect()  # the next send connects afresh
        local.used = now
        return conn

    def evalsha(self, script, keys: list, args: list, idempotent: bool):
        conn = self._connection()
        failures = 0
        while True:
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args,
                                  check_health=False)
                return conn.read_response()
            except NoScriptError:  # not run: load it (server restarted or flushed)
                conn.send_command("SCRIPT", "LOAD", script.script, check_health=False)
                conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                failures += 1
                if not idempotent or failures > 1:
                    raise

    def pipeline(self, commands: list[tuple]) -> list:
        """Run ``commands`` in one round trip, in order; their replies (read-only: retried
        once). Not MULTI/EXEC: at maxmemory Redis 7 refuses to queue any command in a
        transaction, reads included."""
        conn = self._connection()
        packed = conn.pack_commands(commands)
        failures = 0
        while True:
            try:
                conn.send_packed_command(packed, check_health=False)
                return [conn.read_response() for _ in commands]
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                failures += 1
                if failures > 1:
                    raise
            except BaseException:
                conn.disconnect()  # replies may be left unread: never reuse the socket
                raise

    def close(self) -> None:
        with self._lock:
            connections = list(self._connections)
            self._connections = weakref.WeakSet()
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.disconnect()
