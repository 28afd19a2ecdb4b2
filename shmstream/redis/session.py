"""A handle on one generation of a Redis session: producing, reading, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from shmstream.redis.connections import store_call
from shmstream.redis.notifier import Watch
from shmstream.store import ring
from shmstream.store.errors import OffsetLost, SessionNotFound, StoreUnavailable
from shmstream.store.interface import Session, SessionInfo
from shmstream.store.states import State

if TYPE_CHECKING:
    from shmstream.redis.store import RedisStore

log = logging.getLogger("shmstream.redis")

RECHECK_INTERVAL = 1.0  # an idle reader looks at Redis at least this often (lease expiry)
UNREACHABLE_RECHECK = 1.0  # seconds producer_should_stop waits after Redis failed it
PUBLISH_BYTES = 64 * 1024  # appends up to this size travel in their notification
RUNNING = b"0"  # State.RUNNING as stored


def _spans(capacity: int, offset: int, total: int, limit: int | None) -> list[int]:
    """Inclusive GETRANGE positions holding stream bytes ``[offset, end)``, where ``end`` is
    ``total`` capped at ``limit`` bytes from ``offset`` (at most capacity of them), as a
    flat ``[start, stop, ...]`` list: the ring layout of :func:`ring.read`."""
    end = total if limit is None else min(total, offset + limit)
    position = offset % capacity
    length = end - offset
    if position + length <= capacity:
        return [position, position + length - 1]
    return [position, capacity - 1, 0, length - (capacity - position) - 1]


class RedisSession(Session):
    """A handle on one generation of a session. Not thread-safe: one handle per thread."""

    def __init__(self, store: RedisStore, gen: str, conversation_id: str, capacity: int,
                 control: Watch | None = None):
        self.conversation_id = conversation_id
        self.store = store
        self.generation = gen
        self.capacity = capacity
        self._health = store._health
        prefix = store._prefix
        self._meta = prefix + "s:" + gen
        self._data = prefix + "d:" + gen
        self._lease = prefix + "l:" + gen
        self._notify_channel = (prefix + "n:" + gen).encode()
        self._control_channel = (prefix + "k:" + gen).encode()
        self._notify: Watch | None = None
        self._control = control
        self._verified = -1  # the control subscription's confirmation Redis was checked after
        self._stopped = False  # this handle finished or cancelled the session
        self._total = 0  # the highest total this handle saw
        self._ticket = 0
        self._seen_seq = -1  # the notify seq when Redis last said "nothing new"
        self._seen_at = 0.0
        self._closed = False
        self._close_lock = threading.Lock()
        self._unreachable_until = 0.0  # producer_should_stop: Redis failed, ask after this

    def __repr__(self) -> str:
        return f"RedisSession(generation={self.generation!r})"

    def reopen(self) -> RedisSession:
        # A generation's keys outlive a replace or evict by a grace period for open handles.
        return RedisSession(self.store, self.generation, self.conversation_id, self.capacity)

    # --- producing ------------------------------------------------------------------------
    @store_call
    def append(self, data) -> bool:
        if len(data) == 0:
            return True
        store = self.store
        total = store._hot.evalsha(store._scripts["append"], [self._meta, self._data],
                                   [bytes(data), self._notify_channel, PUBLISH_BYTES],
                                   idempotent=False)
        if total < 0:
            return False
        self._total = total
        return True

    @store_call
    def _finish(self, state: State, cancel: bool) -> bool:
        if state is State.RUNNING:
            raise ValueError("finalize needs a terminal state")
        store = self.store
        ended, _exists = store._scripts["finish"](
            args=[store._prefix, self.generation, int(state), "1" if cancel else "0",
                  *store._finish_times()]
        )
        self._stopped = True
        if ended:
            store._keeper_discard(self.generation)
        return bool(ended)

    @property
    def producer_should_stop(self) -> bool:
        """Also while Redis cannot be reached this never raises: it says False (nothing
        proves a cancel) and asks again after ``UNREACHABLE_RECHECK``; the producer's next
        append raises StoreUnavailable."""
        if self._stopped:
            return True
        control = self._control
        if control is None:
            control = self._control = self.store._notifier().acquire(self._control_channel)
        if control.stopped:
            return True
        if control.confirmed and self._verified == control.confirmations:
            return False
        # Not subscribed yet, or subscribed again after a reconnect: what happened before
        # the subscription took effect is only in Redis. One round trip, then the flag does.
        epoch = control.confirmations if control.confirmed else -1
        if time.monotonic() < self._unreachable_until:
            return False
        try:
            fields = self._stop_fields()
        except StoreUnavailable:
            self._unreachable_until = time.monotonic() + UNREACHABLE_RECHECK
            return False
        if fields[0] != RUNNING or fields[1] == b"1":
            control.stopped = True
            return True
        self._verified = epoch
        return False

    @store_call
    def _stop_fields(self) -> list:
        return self.store._redis.hmget(self._meta, "state", "cancel")

    # --- reading --------------------------------------------------------------------------
    @store_call
    def info(self) -> SessionInfo:
        store = self.store
        pipe = store._redis.pipeline(transaction=False)
        store._queue_info(pipe, self.generation)
        pipe.pubsub_numsub(self._notify_channel)
        replies = pipe.execute(raise_on_error=False)
        numsub = replies.pop()
        if isinstance(numsub, Exception):
            raise numsub
        info = store._info_from_replies(replies, numsub[0][1] if numsub else 0)
        if info is None:
            raise SessionNotFound()
        return info

    def _fetch(self, spans: list[int]):
        """The span bytes, then the header, in one round trip: ``(total, finished, pieces)``,
        or None when the session is gone (expired, or evicted past its grace period).

        The header is read after the bytes (Redis runs one connection's commands in order),
        so ``total`` counts every append that could have overwritten them: the caller's
        check ``offset >= dropped_for(total)`` is Aeron's check after copy, and needs no
        transaction. Not a script: Lua would copy every byte twice more (measured: a 4 MiB
        read took 11-18 ms through Lua, 4-8 ms as plain commands on the same connection).
        """
        store = self.store
        data = self._data
        commands = [("GETRANGE", data, spans[i], spans[i + 1]) for i in range(0, len(spans), 2)]
        commands += [("HMGET", self._meta, "state", "total"), ("EXISTS", self._lease)]
        reply = store._hot.pipeline(commands)
        (state, total), lease = reply[-2], reply[-1]
        if state is None:
            return None
        total = int(total)
        if total > self._total:
            self._total = total
        if state == RUNNING and not lease:
            if store._scripts["abort_if_dead"](
                args=[store._prefix, self.generation, *store._finish_times()]
            ):
                log.warning("session generation %s: producer lease expired; aborted",
                            self.generation)
            return self._fetch(spans)  # finished now, or the producer renewed just in time
        return total, state != RUNNING, reply[:-2]

    def _poll(self, offset: int, limit: int | None) -> tuple[bytes, bool]:
        local = self._poll_local(offset, limit)
        return local if local is not None else self._poll_remote(offset, limit)

    def _poll_local(self, offset: int, limit: int | None) -> tuple[bytes, bool] | None:
        """What this process already knows, with no round trip: the published bytes from
        ``offset``, or "nothing new" while nothing was announced since Redis said so; None
        when Redis must be asked. Raises OffsetLost if announcements lapped ``offset``."""
        watch = self._notify
        if watch is None:
            return None
        self._ticket = watch.seq  # before looking at Redis: no wake-up can be missed
        if watch.total > self._total:
            self._total = watch.total
        if offset < self._total:
            # Lapped by what was announced: lost, as the shm reader would find it.
            ring.next_step(self._total, self.capacity, False, offset)
            chunk = watch.cached(offset, limit)
            if chunk:
                return chunk, False
        if (offset >= self._total and watch.confirmed and self._ticket == self._seen_seq
                and time.monotonic() - self._seen_at < RECHECK_INTERVAL):
            return b"", watch.ended  # nothing was announced since Redis said so
        return None

    @store_call
    def _poll_remote(self, offset: int, limit: int | None) -> tuple[bytes, bool]:
        """Ask Redis for the header and the bytes from ``offset``; subscribe to the session
        when there is nothing to read yet (the watch's confirmation bumps it: re-poll)."""
        capacity = self.capacity
        watch = self._notify
        known = self._total
        spans: list[int] = []
        if offset < known:
            ring.next_step(known, capacity, False, offset)  # raises OffsetLost if lapped
            spans = _spans(capacity, offset, known, limit)
        header = self._fetch(spans)
        if header is None:
            return b"", True
        total, finished, pieces = header
        step = ring.next_step(total, capacity, finished, offset)
        if step is ring.Step.DATA:
            if not spans:  # the header was the news: fetch the bytes it announced
                spans = _spans(capacity, offset, total, limit)
                header = self._fetch(spans)
                if header is None:
                    return b"", True
                total, finished, pieces = header
            # The copy is good only if the producer did not lap it meanwhile (same call).
            if offset < ring.dropped_for(total, capacity):
                raise OffsetLost()
            return b"".join(pieces), finished
        if step is ring.Step.END:
            return b"", True
        if watch is None:
            notifier = self.store._notifier()
            watch = notifier.acquire(self._notify_channel)
            with self._close_lock:  # close() may run meanwhile: an async reader's task
                closed = self._closed  # was cancelled while this ran in the executor
                if not closed:
                    self._notify = watch
            if closed:
                notifier.release(watch)
                return b"", True
            self._ticket = watch.seq  # its confirmation will bump seq: we re-poll then
        self._seen_seq = self._ticket
        self._seen_at = time.monotonic()
        return b"", False

    def _sleep(self, timeout: float) -> None:
        watch = self._notify
        if watch is None:
            time.sleep(timeout)
        else:
            watch.wait(self._ticket, timeout)

    async def _apoll(self, offset: int, limit: int | None) -> tuple[bytes, bool]:
        """:meth:`Session.aread`'s poll without blocking the loop on Redis: bytes this
        process already has (published with their append) come at once; a round trip runs
        in the loop's default executor. Waiting then costs a future woken by the notifier,
        not a thread (:meth:`_await_change`). Raises OffsetLost, and StoreUnavailable while
        Redis is down."""
        step = self._poll_local(offset, limit)
        if step is None:
            step = await asyncio.to_thread(self._poll_remote, offset, limit)
        return step

    async def _await_change(self, timeout: float) -> None:
        watch = self._notify
        if watch is None:
            await asyncio.sleep(timeout)
        else:
            await watch.wait_async(self._ticket, timeout)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            watches = [self._notify, self._control]
            self._notify = self._control = None
        notifier = self.store._current_notifier()
        if notifier is not None:
            for watch in watches:
                if watch is not None:
                    notifier.release(watch)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
