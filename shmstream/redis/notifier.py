"""Waking readers: one pub/sub connection and listener thread per store and process.

Every append publishes ``t<total>`` (and, up to 64 KiB, ``:<bytes>``) on the session's
notify channel; finishing publishes ``e<state>`` there and on the control channel, and a
cancel ``c`` on the control channel. A process subscribes once per session and channel kind
(reference-counted :class:`Watch` objects), however many of its readers wait: the shm
backend's "one waiter per process" rule. Local readers wait on the watch: threads on its
:class:`threading.Condition`, coroutines on futures that the listener resolves with one
``loop.call_soon_threadsafe`` per event loop (no thread per reader).

Each watch keeps the latest 256 KiB of published bytes, contiguous by offset, so a caught-up
reader takes its bytes from memory with no round trip (a gap, e.g. a bigger chunk or a
reconnect, resets the cache and the reader fetches from the ring). After a reconnect every
watch is resubscribed and bumped: messages may have been lost meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time

import redis

from shmstream.redis import _redis_internals
from shmstream.redis.connections import Health

log = logging.getLogger("shmstream.redis")


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _settle_all(futures) -> None:
    for future in futures:
        _settle(future)


class Watch:
    """What one process knows about one session channel, fed by the listener thread.

    ``seq`` moves on every message and on (re)subscription; a waiter compares it with the
    ticket it took before looking at Redis, as the shm reader does with the futex word.
    ``cache`` holds the latest published bytes, contiguous from stream offset
    ``cache_start`` (at most ``CACHE_BYTES``): caught-up readers of this process read them
    without asking Redis. Guarded by ``cond``.
    """

    __slots__ = ("channel", "cond", "seq", "total", "stopped", "ended", "confirmed",
                 "confirmations", "refs", "cache", "cache_start", "_async_waiters")
    CACHE_BYTES = 256 * 1024

    def __init__(self, channel: bytes):
        self.channel = channel
        self.cond = threading.Condition(threading.Lock())
        self.seq = 0
        self.total = 0  # the highest total announced (a lower bound of the real one)
        self.stopped = False  # cancelled or finished
        self.ended = False  # finished
        self.confirmed = False  # the subscription is active: no message can be missed
        self.confirmations = 0  # how many times it became active (again, after reconnects)
        self.refs = 0
        self.cache = bytearray()
        self.cache_start = 0
        # Coroutines waiting in wait_async, by event loop: one wake-up per loop resolves
        # them all (the listener thread cannot touch a loop's futures directly).
        self._async_waiters: dict[asyncio.AbstractEventLoop, set[asyncio.Future]] = {}

    def remember(self, total: int, chunk: bytes | None) -> None:
        """Record an append that ended at ``total`` (its bytes, if published) and wake."""
        with self.cond:
            if chunk is not None:
                cache = self.cache
                start = total - len(chunk)
                if self.cache_start + len(cache) != start:  # a gap: keep only what follows
                    cache.clear()
                    self.cache_start = start
                cache += chunk
                excess = len(cache) - self.CACHE_BYTES
                if excess > 0:
                    del cache[:excess]  # cheap: bytearray deletes from the front in place
                    self.cache_start += excess
            if total > self.total:
                self.total = total
            self.seq += 1
            self.cond.notify_all()
            self._wake_async()

    def cached(self, offset: int, limit: int | None) -> bytes:
        """Published bytes from ``offset`` on (at most ``limit``), or b"" if not cached."""
        with self.cond:
            start = self.cache_start
            end = start + len(self.cache)
            if not start <= offset < end:
                return b""
            if limit is not None and offset + limit < end:
                end = offset + limit
            return bytes(self.cache[offset - start : end - start])

    def forget(self) -> None:
        with self.cond:
            self.cache.clear()

    def bump(self) -> None:
        with self.cond:
            self.seq += 1
            self.cond.notify_all()
            self._wake_async()

    def wait(self, ticket: int, timeout: float) -> None:
        """Block this thread until ``seq`` moves past ``ticket``, or ``timeout``."""
        with self.cond:
            if self.seq == ticket:
                self.cond.wait(timeout)

    async def wait_async(self, ticket: int, timeout: float) -> None:
        """Wait on the running loop until ``seq`` moves past ``ticket``, or ``timeout``,
        without a thread: the listener wakes every coroutine of a loop with one
        ``call_soon_threadsafe``."""
        loop = asyncio.get_running_loop()
        with self.cond:
            if self.seq != ticket:
                return
            future = loop.create_future()
            self._async_waiters.setdefault(loop, set()).add(future)
        timer = loop.call_later(timeout, _settle, future)
        try:
            await future
        finally:
            timer.cancel()
            with self.cond:
                waiters = self._async_waiters.get(loop)
                if waiters is not None:
                    waiters.discard(future)
                    if not waiters:
                        del self._async_waiters[loop]

    def _wake_async(self) -> None:
        """With ``cond`` held: schedule the wake-up of every coroutine waiting."""
        if not self._async_waiters:
            return
        waiting, self._async_waiters = self._async_waiters, {}
        for loop, futures in waiting.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle_all, futures)


class Notifier:
    """One pub/sub connection and listener thread per store and process.

    Callers subscribe and unsubscribe from their own threads (sends are serialized by
    ``_lock``); only the listener reads. Confirmations arrive in the order the SUBSCRIBE
    commands were sent, so a FIFO of watches tells which watch each one confirms. After a
    reconnect every watch is resubscribed and bumped: messages may have been lost meanwhile.
    """

    IDLE_UNSUBSCRIBE = 5.0  # seconds an unreferenced live watch stays subscribed for reuse

    def __init__(self, pool: redis.ConnectionPool, health: Health):
        self._pool = pool
        self._health = health  # an outage is this process's one line (down, back), not ours
        # Reentrant: a handle's __del__ (which releases) may run in any thread, this one too.
        self._lock = threading.RLock()
        self._watches: dict[bytes, Watch] = {}
        self._idle: dict[bytes, float] = {}
        self._pending: collections.deque[Watch] = collections.deque()
        self._conn = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="shmstream-redis-pubsub",
                                        daemon=True)
        self._thread.start()

    # --- callers ---------------------------------------------------------------------------
    def acquire(self, channel: bytes) -> Watch:
        with self._lock:
            watch = self._watches.get(channel)
            if watch is None:
                watch = self._watches[channel] = Watch(channel)
                self._subscribe(watch)
            watch.refs += 1
            self._idle.pop(channel, None)
            return watch

    def release(self, watch: Watch) -> None:
        with self._lock:
            watch.refs -= 1
            if watch.refs > 0 or self._watches.get(watch.channel) is not watch:
                return
            if watch.ended:
                self._unsubscribe(watch)
            else:
                self._idle[watch.channel] = time.monotonic()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._send("PING")  # wakes the listener out of its read
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        with self._lock:
            if self._conn is not None:
                self._conn.disconnect()
                self._conn = None
            for watch in self._watches.values():
                watch.confirmed = False
                watch.bump()

    # --- with _lock held -------------------------------------------------------------------
    def _send(self, *args) -> None:
        conn = self._conn
        # No socket: the listener is reconnecting and will subscribe every watch. Sending
        # now would make redis-py reconnect silently, without those subscriptions.
        if conn is None or not _redis_internals.is_connected(conn):
            return
        try:
            conn.send_command(*args, check_health=False)
        except Exception as exc:  # redis-py closed the socket: the listener's read fails
            log.warning("redis pub/sub send failed (%s); the listener reconnects", exc)

    def _subscribe(self, watch: Watch) -> None:
        if self._conn is not None:
            self._pending.append(watch)
            self._send("SUBSCRIBE", watch.channel)

    def _unsubscribe(self, watch: Watch) -> None:
        del self._watches[watch.channel]
        self._idle.pop(watch.channel, None)
        self._send("UNSUBSCRIBE", watch.channel)

    # --- the listener thread ---------------------------------------------------------------
    def _connect(self):
        conn = _redis_internals.pubsub_connection(self._pool)
        conn.connect()
        with self._lock:
            self._conn = conn
            self._pending.clear()
            watches = list(self._watches.values())
            for watch in watches:
                self._subscribe(watch)
        return conn

    def _run(self) -> None:
        backoff = 0.05
        lost = False  # the connection went: readers re-check once it is back
        while not self._stopping:
            try:
                conn = self._connect()
                backoff = 0.05
                if lost:
                    lost = False
                    log.debug("redis pub/sub connection restored; readers re-check")
                    self._health.succeeded()
                while not self._stopping:
                    if conn.can_read(timeout=1.0):
                        self._dispatch(conn.read_response(disconnect_on_error=False))
                    else:
                        self._sweep()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if self._stopping:
                    break
                # A lost connection alone (Redis closing idle clients) is no outage: the
                # next connect tells, and only a failed one is logged, once per process.
                if lost:
                    self._health.failed(exc)
                log.debug("redis pub/sub connection down (%s); reconnecting", exc)
                lost = True
            except Exception:  # keep waking readers whatever happens; they fall back to polls
                log.exception("redis pub/sub listener failed; reconnecting")
            with self._lock:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.disconnect()
                    self._conn = None
                watches = list(self._watches.values())
            for watch in watches:
                watch.confirmed = False
                watch.forget()  # messages may have been lost: no gap may hide in a cache
                watch.bump()
            if not self._stopping:
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def _dispatch(self, response) -> None:
        kind = response[0]
        if kind == b"message":
            watch = self._watches.get(response[1])
            if watch is None:
                return
            data = response[2]
            head = data[:1]
            if head == b"t":
                colon = data.find(b":", 1)
                if colon < 0:
                    watch.remember(int(data[1:]), None)
                else:
                    watch.remember(int(data[1:colon]), data[colon + 1 :])
                return
            if head == b"e":
                watch.ended = True
            watch.stopped = True
            watch.bump()
            if watch.ended:
                with self._lock:
                    if watch.refs <= 0 and self._watches.get(watch.channel) is watch:
                        self._unsubscribe(watch)
        elif kind == b"subscribe":
            with self._lock:
                watch = self._pending.popleft() if self._pending else None
            if watch is not None:
                watch.confirmations += 1
                watch.confirmed = True
                watch.bump()

    def _sweep(self) -> None:
        cutoff = time.monotonic() - self.IDLE_UNSUBSCRIBE
        with self._lock:
            for channel, since in list(self._idle.items()):
                watch = self._watches.get(channel)
                if since <= cutoff and watch is not None and watch.refs <= 0:
                    self._unsubscribe(watch)
