"""One futex waiter per session per process, waking every local reader through its loop.

An event-driven worker may hold hundreds of readers of one session. If each of them armed a
futex wait of its own (a thread each), every append would wake them all across every
process. Instead each process has at most one :class:`SessionWaiter` per session with
waiting readers: a small daemon thread that sleeps on the segment's doorbell word (the
blocking futex call releases the GIL; nothing here spins) and, when the word moves, wakes
every local reader of that session with one ``call_soon_threadsafe`` per event loop. The
producer then makes one wake syscall per append for the whole host, counted by the header's
``waiters`` field as one waiter per process.

The order that loses no wake-up (DESIGN.md, "Locking, waking, dying"):

- a reader takes its ticket (the doorbell word) under the segment lock together with
  ``total`` and the state (:meth:`ShmSession._poll`), and waits only while the word still
  holds that ticket;
- the waiter thread reads the word under the lock and counts itself in ``waiters`` in the
  same critical section, wakes at once every reader whose ticket differs, and futex-waits on
  the value it read (the kernel returns at once if the word moved meanwhile);
- a producer publishes ``total``, bumps the word, and rings when ``waiters`` is non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass

from shmstream.shm import layout
from shmstream.store.states import State

LINGER = 0.5  # seconds an idle waiter of a running session stays for readers coming back
WAIT_SLICE = 1.0  # longest single futex wait while readers wait

_FUTEX_I = layout.FUTEX_I
_WAITERS_I = layout.WAITERS_I
_STATE_I = layout.STATE_I
_RUNNING = State.RUNNING


@dataclass(eq=False)
class _Entry:
    ticket: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _wake(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def session_key(segment) -> tuple:
    """What identifies one shared-memory object across this process's mappings of it: its
    inode where the segment knows it, else the header fields written once at creation (a
    replaced session with the same name has a new creation time and producer)."""
    inode = getattr(segment, "inode", 0)
    if inode:
        return ("inode", inode)
    header = segment.header
    return (segment.name, header.started_at_us, header.producer_pid, header.producer_start)


class SessionWaiter:
    """The waiter thread of one session in this process. Use :func:`wait` rather than this
    class; it exists on its own for tests (``waits`` counts futex waits)."""

    def __init__(self, hub: WaiterHub, key: tuple, segment, first: _Entry):
        self.hub = hub
        self.key = key
        self.segment = segment.retain()  # the mapping stays valid while the thread uses it
        self._guard = threading.Lock()
        # Registered before the thread starts: a thread that found no reader would exit at
        # once (a finished session) and the next reader would start another, forever.
        self._entries: set[_Entry] = {first}
        self._armed: int | None = None  # the doorbell word the thread waits on next
        self.closed = False
        self.waits = 0  # futex waits armed (counted in the header's waiters field)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"shm-waiter-{segment.name[-8:]}")
        self._thread.start()

    def add(self, entry: _Entry) -> bool:
        """Register a waiting reader; False if this waiter is closing (make a new one)."""
        with self._guard:
            if self.closed:
                return False
            if self._armed is not None and entry.ticket != self._armed:
                # The word moved past this ticket before the thread armed its wait: the
                # thread would not see it, so wake the reader now (it re-polls).
                self._dispatch({entry.loop: [entry.future]})
                return True
            self._entries.add(entry)
        return True

    def discard(self, entry: _Entry) -> None:
        with self._guard:
            self._entries.discard(entry)

    def _take_stale(self, word: int) -> dict:
        """Remove and return, by loop, the entries whose ticket is not ``word``; entries
        added from now on are checked against ``word`` (see :meth:`add`)."""
        by_loop: dict = {}
        with self._guard:
            self._armed = word
            stale = [entry for entry in self._entries if entry.ticket != word]
            for entry in stale:
                self._entries.discard(entry)
                by_loop.setdefault(entry.loop, []).append(entry.future)
        return by_loop

    def _run(self) -> None:
        segment = self.segment
        i = segment.header.i
        lock = segment.lock
        try:
            lock.acquire()
            try:
                word, finished = self._arm(i)
            finally:
                lock.release()
            idle_until = None  # while no reader waits: when the thread gives up and unmaps
            while not finished:  # once finished every reader re-polls, reads the rest, ends
                woken = self._take_stale(word)
                self._dispatch(woken)
                leaving = woke = False
                with self._guard:
                    if self._entries or woken:
                        # Readers just woken come back once they have sent their bytes:
                        # not idle (once this counted as idle, a streaming session's
                        # thread quit and was started again every LINGER seconds).
                        idle_until, timeout = None, WAIT_SLICE
                    else:
                        # Linger for readers that come back right after a wake, but on the
                        # doorbell, not on a local condition: the finalize rings it, so a
                        # session that ends meanwhile is unmapped at once (a DELETE then
                        # frees its pages instead of retiring it).
                        now = time.monotonic()
                        if idle_until is None:
                            idle_until = now + LINGER
                        timeout = idle_until - now
                        if timeout <= 0:
                            self.closed = leaving = True  # no reader can join now
                try:
                    if not leaving:
                        self.waits += 1
                        segment.doorbell.wait(word, timeout)
                        woke = True
                finally:
                    # One lock hold per wake: uncount the wait that ended and, unless the
                    # thread leaves, count the next one with the word it reads (the same
                    # as two holds back to back, one semaphore round trip less). A publish
                    # that rang for us took us off the count already (see
                    # ShmSession.append): only an unrung wait uncounts itself.
                    lock.acquire()
                    try:
                        if i[_FUTEX_I] == word:
                            i[_WAITERS_I] -= 1
                        if woke:
                            word, finished = self._arm(i)
                    finally:
                        lock.release()
                if leaving:
                    break
        finally:
            with self._guard:  # no reader can join a closed waiter: the rest are woken here
                self.closed = True
            self.hub.forget(self)
            last = self._take_stale(-1)
            # Unmap before the last readers wake: by the time their answers end, no mapping
            # of ours keeps a removed session's pages (and quota) held.
            segment.close()
            self._dispatch(last)

    @staticmethod
    def _arm(i) -> tuple[int, bool]:
        """Lock held: (the doorbell word, whether the session finished); while it runs,
        count this thread in ``waiters``, seen by the next publish, which rings for us."""
        word = i[_FUTEX_I]
        finished = i[_STATE_I] != _RUNNING
        if not finished:
            i[_WAITERS_I] += 1
        return word, finished

    @staticmethod
    def _dispatch(by_loop: dict) -> None:
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its readers are gone
                loop.call_soon_threadsafe(_wake, futures)


class WaiterHub:
    """This process's waiters, by session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[tuple, SessionWaiter] = {}

    def waiter_count(self) -> int:
        """Sessions with a waiter thread in this process now."""
        with self._lock:
            return len(self._waiters)

    def waiter_for(self, segment) -> SessionWaiter | None:
        with self._lock:
            return self._waiters.get(session_key(segment))

    def forget(self, waiter: SessionWaiter) -> None:
        with self._lock:
            if self._waiters.get(waiter.key) is waiter:
                del self._waiters[waiter.key]

    def _register(self, segment, entry: _Entry) -> SessionWaiter:
        key = session_key(segment)
        while True:
            with self._lock:
                waiter = self._waiters.get(key)
                if waiter is None or waiter.closed:
                    waiter = self._waiters[key] = SessionWaiter(self, key, segment, entry)
                    return waiter
            if waiter.add(entry):
                return waiter
            self.forget(waiter)  # it closed between the lookup and the add

    async def wait(self, segment, ticket: int, timeout: float) -> None:
        """Return once the doorbell word of ``segment`` differs from ``ticket`` (new bytes or
        a terminal state may be there), or after ``timeout`` seconds. Cancellable."""
        if segment.header.i[_FUTEX_I] != ticket:
            return  # published since the ticket was taken
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        entry = _Entry(ticket, loop, future)
        waiter = self._register(segment, entry)
        timer = loop.call_later(timeout, _wake, [future])
        try:
            await future
        finally:
            timer.cancel()
            waiter.discard(entry)


_hub = WaiterHub()


def hub() -> WaiterHub:
    """This process's hub (a fresh one after fork: threads do not survive it)."""
    return _hub


def _after_fork() -> None:
    global _hub
    _hub = WaiterHub()


os.register_at_fork(after_in_child=_after_fork)
