"""The session store interface every backend implements (shared memory, Redis).

The HTTP layer talks only to these classes, so it never knows which backend it uses. The
protocol decisions that are the same everywhere (what a reader does at an offset, when it
stops) live here and in :mod:`shmstream.store.ring`, not in the backends.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from shmstream.store.states import State

DEFAULT_CAPACITY = 4 * 1024 * 1024  # bytes held per session (the seed's cap)
DEFAULT_TTL = 300.0  # seconds a finished session stays readable
DEFAULT_GC_INTERVAL = 60.0  # seconds between garbage collections
WAKE_INTERVAL = 0.2  # a waiting reader re-checks should_stop at least this often


@dataclass(frozen=True)
class SessionInfo:
    """A consistent snapshot of one session's header."""

    conversation_id: str
    state: State
    total_bytes: int
    dropped_bytes: int
    capacity: int
    started_at: float  # unix seconds
    completed_at: float  # unix seconds, 0 while running
    producer_pid: int = 0
    producer_alive: bool = True
    waiters: int = 0
    metadata: dict = field(default_factory=dict)
    # bytes of storage the session occupies now (shm: pages allocated to its ring; Redis:
    # the ring string's size); 0 where a backend cannot tell
    allocated_bytes: int = 0
    # shm: /dev/shm (or the quota) was full when the ring needed to grow, so its capacity
    # was lowered to what it had (it streams on, dropping its oldest bytes)
    ring_capped: bool = False

    @property
    def is_done(self) -> bool:
        return self.state.is_terminal

    def lookup_entry(self) -> dict:
        """The ``POST /v1/streams/lookup`` object (the seed's fields first)."""
        return {
            "conversation_id": self.conversation_id,
            "is_done": self.is_done,
            "total_bytes": self.total_bytes,
            "started_at": int(self.started_at),
            "completed_at": int(self.completed_at),
            "state": self.state.label,
            "dropped_bytes": self.dropped_bytes,
        }


@dataclass
class GCReport:
    """What one garbage-collection pass did (ids are not included: they are capabilities)."""

    expired: int = 0  # finished sessions removed after their TTL
    aborted: int = 0  # running sessions whose producer died, finalized as aborted
    locks_recovered: int = 0  # locks released from dead holders
    corrupt_removed: int = 0  # unfinished or orphaned objects removed
    kept: int = 0


def matches_lookup(conversation_id: str, requested: str) -> bool:
    """``lookup`` matching: the exact id, or the id followed by ``::`` and anything."""
    return conversation_id == requested or conversation_id.startswith(requested + "::")


class ProducerDoorbell(Protocol):
    """A line to the session's producer itself, which rings it after every change (new
    bytes, the end) that may have come after the reader's last poll (the relay's hand-off
    connection, :class:`shmstream.relay.handoff.RelayDoorbell`). Cheaper per event than
    the store's own wake-up: no waiter thread, no futex, one socket read in the loop."""

    alive: bool  # False once the line broke: the reader falls back to the store's wake-up

    async def wait(self, timeout: float) -> None:
        """Return once the producer rang, the line broke, or ``timeout`` seconds passed.
        A ring may be stale (the change was already polled): the reader just polls."""


class Session(abc.ABC):
    """A handle on one session. Handles are cheap; use one per thread and close it.

    The producer appends and finalizes; any process may read, cancel or inspect.
    """

    conversation_id: str
    replaced = False  # set by create_or_replace: a session with this id was there before

    # --- producing ------------------------------------------------------------------------
    @abc.abstractmethod
    def append(self, data: bytes) -> bool:
        """Append bytes; False once the session is finalized (empty appends return True)."""

    def finalize(self, state: State = State.DONE) -> bool:
        """End the session in ``state`` and wake every reader. True if this call ended it;
        a session already finished keeps its first terminal state."""
        return self._finish(state, cancel=False)

    def cancel(self) -> bool:
        """Flag the session cancelled (its producer observes it) and finalize it."""
        return self._finish(State.CANCELLED, cancel=True)

    @abc.abstractmethod
    def _finish(self, state: State, cancel: bool) -> bool:
        """Atomically: set the cancel flag if ``cancel``; if running, move to ``state``,
        stamp the completion time and wake every reader. True if this call ended it.
        Raises ValueError for ``State.RUNNING``."""

    @property
    @abc.abstractmethod
    def producer_should_stop(self) -> bool:
        """True once the session was cancelled or finished by anyone (a cheap check)."""

    # --- reading --------------------------------------------------------------------------
    @abc.abstractmethod
    def reopen(self) -> Session:
        """Another handle on this very session (for another thread), also after its id was
        replaced or evicted; close each handle."""

    @abc.abstractmethod
    def info(self) -> SessionInfo: ...

    def metadata(self) -> dict:
        """The metadata the session was created with (it never changes): what tells one
        session from a later one with the same id. This default reads :meth:`info`; a
        backend that can read it alone (no liveness check, no counters) overrides it."""
        return self.info().metadata

    def read_held(self, limit: int | None = None) -> tuple[SessionInfo, bytes]:
        """One :meth:`info` and the held bytes from its ``dropped_bytes`` on (at most
        ``limit``, never past its ``total_bytes``), consistent with each other: what a
        snapshot starts from. Never waits.

        Raises :class:`~shmstream.store.errors.OffsetLost` if those bytes were dropped
        between the two reads of this default; a backend that can take both at once
        (the shared-memory one: one lock hold) overrides it and never raises.
        """
        info = self.info()
        if info.total_bytes <= info.dropped_bytes:
            return info, b""  # nothing held: _poll would arm a wake-up nobody sleeps on
        wanted = info.total_bytes - info.dropped_bytes
        chunk, _finished = self._poll(info.dropped_bytes,
                                      wanted if limit is None else min(limit, wanted))
        return info, chunk

    @abc.abstractmethod
    def _poll(self, offset: int, limit: int | None) -> tuple[bytes, bool]:
        """Bytes from ``offset`` (maybe empty) and whether the session finished.

        Raises :class:`~shmstream.store.errors.OffsetLost`. When it returns no bytes and not
        finished, the backend has armed its wake-up: :meth:`_sleep` must follow.
        """

    @abc.abstractmethod
    def _sleep(self, timeout: float) -> None:
        """Block until new bytes or a terminal state may be there, or ``timeout``."""

    def read(
        self,
        offset: int = 0,
        should_stop: Callable[[], bool] | None = None,
        wake_interval: float = WAKE_INTERVAL,
        limit: int | None = None,
    ) -> Iterator[bytes]:
        """Yield the session's bytes from ``offset`` on, live, until it ends.

        Ends when the session is finished and everything was yielded, or when
        ``should_stop()`` turns true (checked at least every ``wake_interval`` seconds).
        Raises :class:`~shmstream.store.errors.OffsetLost` if ``offset`` (or a later position of
        this reader, lapped by the producer) is no longer held.
        """
        while True:
            if should_stop is not None and should_stop():
                return
            chunk, finished = self._poll(offset, limit)
            if chunk:
                offset += len(chunk)
                yield chunk
            elif finished:
                return
            else:
                self._sleep(wake_interval)

    def aread(self, offset: int = 0, wake_interval: float = WAKE_INTERVAL,
              limit: int | None = None, doorbell: ProducerDoorbell | None = None
              ) -> AsyncIterator[bytes]:
        """The event-loop twin of :meth:`read`: yields the session's bytes from ``offset``
        on, live, until it ends, and never blocks the loop. A reader whose client left is
        ended by cancelling the task that iterates. Raises
        :class:`~shmstream.store.errors.OffsetLost` as :meth:`read` does.

        With a ``doorbell`` (the request that started the answer has one to its producer)
        the reader waits on it while it works, and on the store's wake-up after that."""
        return SessionReader(self, offset, wake_interval, limit, doorbell)

    async def _apoll(self, offset: int, limit: int | None) -> tuple[bytes, bool]:
        """:meth:`_poll` for an event loop. This default polls inline, which suits a
        backend whose poll takes microseconds (shared memory); a backend whose poll may
        cross the network overrides it."""
        return self._poll(offset, limit)

    async def _await_change(self, timeout: float) -> None:
        """Wait, without blocking the loop, until new bytes or a terminal state may be
        there, or ``timeout``. This default spends a thread per waiting reader; backends
        override it with one waiter per session per process that wakes every local reader."""
        await asyncio.to_thread(self._sleep, timeout)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release this handle's resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SessionReader:
    """:meth:`Session.aread`'s iterator. A class, not an async generator: every event of
    every HTTP reader takes one step of it, and an async generator costs an ``asend``
    object and one more frame in the await chain per step."""

    __slots__ = ("_after_data", "_doorbell", "_inline", "_limit", "_offset", "_session",
                 "_wake_interval")

    def __init__(self, session: Session, offset: int, wake_interval: float,
                 limit: int | None, doorbell: ProducerDoorbell | None):
        self._session = session
        self._offset = offset
        self._wake_interval = wake_interval
        self._limit = limit
        self._doorbell = doorbell
        # A backend that polls inline is called directly: no coroutine per event.
        self._inline = type(session)._apoll is Session._apoll
        self._after_data = False  # the last step returned bytes of a running session

    def __aiter__(self) -> SessionReader:
        return self

    async def __anext__(self) -> bytes:
        session, doorbell = self._session, self._doorbell
        if self._after_data:
            self._after_data = False
            if doorbell is not None and doorbell.alive:
                # Every change since that poll has rung (or left a ring unread): wait for
                # one before polling again, which saves the poll that finds nothing.
                await doorbell.wait(self._wake_interval)
        while True:
            if self._inline:
                chunk, finished = session._poll(self._offset, self._limit)
            else:
                chunk, finished = await session._apoll(self._offset, self._limit)
            if chunk:
                self._offset += len(chunk)
                self._after_data = not finished
                return chunk
            if finished:
                raise StopAsyncIteration
            if doorbell is not None and doorbell.alive:
                await doorbell.wait(self._wake_interval)
            else:
                await session._await_change(self._wake_interval)


class SessionStore(abc.ABC):
    """The registry of sessions, visible to every process that uses the same store."""

    capacity: int
    ttl: float

    @abc.abstractmethod
    def create_or_replace(self, conversation_id: str, metadata: dict | None = None) -> Session:
        """Start a new running session; a live one with this id is cancelled and finalized.

        Raises InvalidConversationId, or StoreUnavailable when there is no room.
        """

    @abc.abstractmethod
    def get(self, conversation_id: str) -> Session | None:
        """A handle on the session with exactly this id, or None."""

    @abc.abstractmethod
    def list(self) -> list[SessionInfo]:
        """Every session of the store (for operators; ids are capabilities)."""

    @abc.abstractmethod
    def lookup(self, conversation_ids: Iterable[str]) -> list[SessionInfo]:
        """Sessions whose id equals a requested id or starts with ``<id>::``, each once."""

    @abc.abstractmethod
    def evict(self, conversation_id: str) -> bool:
        """Finalize (as done, if running) and remove. True if a session was there."""

    @abc.abstractmethod
    def evict_and_cancel(self, conversation_id: str) -> bool:
        """Cancel, finalize and remove: the user's Stop. True if a session was there."""

    @abc.abstractmethod
    def gc(self, now: float | None = None) -> GCReport:
        """Remove sessions finished more than ``ttl`` ago; abort those whose producer died."""

    def allocated_bytes(self) -> int | None:
        """Storage the whole store occupies now, including what its sessions' entries do
        not show (shm: replaced segments that readers still map); None if unknown."""
        return None

    def abort_producers(self, pids: Iterable[int] | None = None, repeated: bool = False
                        ) -> int:
        """Finalize as ``aborted`` running sessions whose producer process on this host died
        (``pids`` None) or is one of ``pids``. Returns how many. Backends that detect dead
        producers by other means (a lease) may rely on :meth:`gc` and return 0.

        ``repeated``: the caller reaps again and again (the supervisor), so the backend may
        keep what it learnt between calls to make each pass cheaper."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release process-local resources (sessions stay in the store)."""


def now_us() -> int:
    return time.time_ns() // 1000
