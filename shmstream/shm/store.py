"""The shared-memory backend: sessions in /dev/shm, visible to every process on the host.

Locking order, always: the namespace's registry flock, then a segment's semaphore. The
registry flock is taken exclusively to create, replace or remove a name, and shared to open
one, so a name never resolves to a half-made or half-removed pair of shm + semaphore.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from time import perf_counter_ns

from posix_ipc import BusyError

from shmstream.shm import layout, segment, waiter
from shmstream.shm.layout import FLAG_CANCEL, FLAG_RING_CAPPED, CorruptSegment
from shmstream.shm.quota import Quota, pages
from shmstream.shm.sync import (
    STUCK_LOCK_TIMEOUT,
    CurrentPid,
    LockTimeout,
    flocked,
    process_alive,
    process_start_time,
)
from shmstream.store import ring
from shmstream.store.errors import InvalidConversationId, StoreUnavailable
from shmstream.store.interface import (
    DEFAULT_CAPACITY,
    DEFAULT_TTL,
    WAKE_INTERVAL,
    GCReport,
    Session,
    SessionInfo,
    SessionStore,
    matches_lookup,
    now_us,
)
from shmstream.store.states import State

log = logging.getLogger("shmstream.store")

# A reader whose bytes arrive closer together than this spins this long on the doorbell
# word before it sleeps in the kernel; slower streams (chat tokens) never spin.
SPIN_NS = 50_000
SPIN_BATCH = 16
# abort_producers runs often (supervisor, child_exit): it skips a busy segment quickly.
REAP_LOCK_TIMEOUT = 1.0

_RUNNING = State.RUNNING
_STATE_I = layout.STATE_I
_FLAGS_I = layout.FLAGS_I
_TOTAL_Q = layout.TOTAL_Q
_ALLOCATED_Q = layout.ALLOCATED_Q
_CAPACITY_Q = layout.CAPACITY_Q
_FUTEX_I = layout.FUTEX_I
_WAITERS_I = layout.WAITERS_I
_COMPLETED_AT_Q = layout.COMPLETED_AT_Q
_LOCK_OWNER_Q = layout.LOCK_OWNER_Q


class ShmSession(Session):
    """A handle on one mapped segment. Not thread-safe: one handle per thread."""

    def __init__(self, seg: segment.Segment, conversation_id: str,
                 may_grow: Callable[[int], int] | None = None):
        self.conversation_id = conversation_id
        self.segment = seg
        self._may_grow = may_grow  # extra bytes -> how many the quota lets the ring grow
        header = seg.header
        self._q = header.q
        self._i = header.i
        self._ring = header.ring
        self._at_cap = False  # allocated reached capacity: never grows again
        self._lock = seg.lock
        self._semaphore = seg.semaphore
        self._lock_check_interval = seg.lock.check_interval
        self._doorbell = seg.doorbell
        self._ticket = 0
        self._armed = False
        self._fast = False  # bytes arrived less than SPIN_NS apart lately
        self._last_data_ns = 0
        self._closed = False
        self._evented = False  # read by aread: this process's waiter wakes it (waiter.py)

    # --- producing ------------------------------------------------------------------------
    def append(self, data) -> bool:
        # The hot path (a few hundred ns per call): the lock's fast path and the ring's
        # no-wrap copy are inlined; RobustLock and ring.write handle the rest.
        length = len(data)
        if length == 0:
            return True
        q, i = self._q, self._i
        try:
            self._semaphore.acquire(self._lock_check_interval)
        except BusyError:
            self._lock.acquire_contended()
        q[_LOCK_OWNER_Q] = CurrentPid.value
        try:
            if i[_STATE_I] != _RUNNING:
                return False
            total = q[_TOTAL_Q]
            if not self._at_cap and total + length > q[_ALLOCATED_Q]:
                self._make_room(total + length)
            capacity = q[_CAPACITY_Q]
            position = total % capacity
            end = position + length
            if end <= capacity:
                self._ring[position:end] = data
                total += length
            else:
                total = ring.write(self._ring, capacity, total, data)
            q[_TOTAL_Q] = total  # publish the bytes, then ring the doorbell
            i[_FUTEX_I] = (i[_FUTEX_I] + 1) & 0xFFFFFFFF
            waiters = i[_WAITERS_I]
            if waiters:
                i[_WAITERS_I] = 0  # this ring wakes them all; see _sleep
        finally:
            q[_LOCK_OWNER_Q] = 0
            self._semaphore.release()
        if waiters:
            self._doorbell.ring()
        return True

    def _make_room(self, needed: int) -> None:
        """Lock held: grow the ring for bytes up to ``needed``, or cap it (Segment.make_room);
        a capped session streams on inside the ring it has, dropping from the front."""
        reason = self.segment.make_room(needed, self._may_grow)
        if reason is not None:
            log.warning("session id=%s: ring capped at %d bytes, it cannot grow (%s); it "
                        "keeps streaming, dropping its oldest bytes",
                        segment.short_hash(self.conversation_id), self._q[_CAPACITY_Q], reason)
        self._at_cap = self._q[_ALLOCATED_Q] >= self._q[_CAPACITY_Q]

    def _finish(self, state: State, cancel: bool) -> bool:
        if state is _RUNNING:
            raise ValueError("finalize needs a terminal state")
        q, i = self._q, self._i
        with self._lock:
            if cancel:
                i[_FLAGS_I] |= FLAG_CANCEL
            ended = i[_STATE_I] == _RUNNING
            if ended:
                i[_STATE_I] = state
                q[_COMPLETED_AT_Q] = now_us()
                i[_FUTEX_I] = (i[_FUTEX_I] + 1) & 0xFFFFFFFF
                waiters = i[_WAITERS_I]
                i[_WAITERS_I] = 0
            else:
                waiters = 0
        if waiters:
            self._doorbell.ring()
        return ended

    @property
    def producer_should_stop(self) -> bool:
        # Two aligned u32 loads without the lock: a stale answer only delays the stop by one
        # watcher period, and neither field ever goes back.
        return bool(self._i[_FLAGS_I] & FLAG_CANCEL) or self._i[_STATE_I] != _RUNNING

    # --- reading --------------------------------------------------------------------------
    def info(self) -> SessionInfo:
        header = self.segment.header
        with self._lock:  # fields read together, never combined with unlocked reads
            state = header.state
            total = header.total
            capacity = header.capacity
            allocated = header.allocated
            capped = bool(header.flags & FLAG_RING_CAPPED)
            started = header.started_at_us
            completed = header.completed_at_us
            pid = header.producer_pid
            start_time = header.producer_start
            waiters = header.waiters
        return SessionInfo(
            conversation_id=self.conversation_id,
            state=state,
            total_bytes=total,
            dropped_bytes=ring.dropped_for(total, capacity),
            capacity=capacity,
            started_at=started / 1e6,
            completed_at=completed / 1e6,
            producer_pid=pid,
            producer_alive=process_alive(pid, start_time),
            waiters=waiters,
            metadata=header.metadata(),
            allocated_bytes=pages(header.ring_offset + allocated),
            ring_capped=capped,
        )

    def reopen(self) -> ShmSession:
        # The mapping stays valid after the name is unlinked (replace, evict): share it.
        return ShmSession(self.segment.retain(), self.conversation_id, self._may_grow)

    def lifecycle(self, timeout: float = STUCK_LOCK_TIMEOUT) -> tuple[State, int, int, int]:
        """(state, completed_at_us, producer pid, producer start time), read together under
        the lock: what gc and reaping decide on. Raises LockTimeout after ``timeout``."""
        header = self.segment.header
        self._lock.acquire(timeout)
        try:
            return (header.state, header.completed_at_us, header.producer_pid,
                    header.producer_start)
        finally:
            self._lock.release()

    def _poll(self, offset: int, limit: int | None) -> tuple[bytes, bool]:
        q, i, lock = self._q, self._i, self._lock
        lock.acquire()
        try:
            total = q[_TOTAL_Q]
            finished = i[_STATE_I] != _RUNNING
            chunk = ring.read(self._ring, q[_CAPACITY_Q], total, offset, limit)
            if not chunk and not finished:
                # The ticket matches this `total`: any later publish moves the word.
                self._ticket = i[_FUTEX_I]
                # Arm the futex wait while still holding the lock, so the producer sees us
                # counted before it next publishes. A reader fed faster than SPIN_NS spins
                # first instead (see _sleep) and stays invisible to the producer.
                self._armed = not (self._fast or self._evented)
                if self._armed:
                    i[_WAITERS_I] += 1
        finally:
            lock.release()
        if chunk:
            now = perf_counter_ns()
            self._fast = now - self._last_data_ns < SPIN_NS
            self._last_data_ns = now
        return chunk, finished

    def _sleep(self, timeout: float) -> None:
        if not self._armed:
            # Bytes have been arriving every few microseconds: watch the doorbell word
            # without the lock for up to SPIN_NS. Catching the next publish here saves the
            # producer a wake syscall and both sides a semaphore handoff per chunk, which
            # is what keeps a fast producer fast with a reader attached.
            # Waiting for SPIN_BATCH publishes (or the spin's end) batches the copies and
            # keeps the reader off the semaphore the producer takes on every append.
            words, ticket = self._i, self._ticket
            deadline = perf_counter_ns() + SPIN_NS
            while perf_counter_ns() < deadline:
                if (words[_FUTEX_I] - ticket) & 0xFFFFFFFF >= SPIN_BATCH:
                    return
            if words[_FUTEX_I] == ticket:
                self._fast = False  # nothing came: the next empty poll arms a real wait
            return
        try:
            self._doorbell.wait(self._ticket, timeout)
        finally:
            # Every publish bumps the word and, under the same lock, takes all counted
            # waiters off the count as it rings for them. So if the word moved since we
            # armed, the first publish after that already uncounted us: a producer rings
            # once per sleep, not once per append while the sleeper is waking up.
            with self._lock:
                if self._i[_FUTEX_I] == self._ticket:
                    self._i[_WAITERS_I] -= 1

    def aread(self, offset: int = 0, wake_interval: float = WAKE_INTERVAL,
              limit: int | None = None):
        # An event-loop reader never spins (that would hold the GIL) and never arms a futex
        # wait of its own: the process's one waiter per session wakes it (shm/waiter.py).
        self._evented = True
        return super().aread(offset, wake_interval, limit)

    async def _await_change(self, timeout: float) -> None:
        await waiter.hub().wait(self.segment, self._ticket, timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ring = None
            self.segment.close()


def _id_tag(session: ShmSession) -> str:
    """The log handle of a session opened without its id (gc): the stored id's hash."""
    try:
        stored = session.segment.header.metadata().get("id")
    except CorruptSegment:
        return "unknown"
    return segment.short_hash(stored) if isinstance(stored, str) else "unknown"


class ShmStore(SessionStore):
    """Sessions in POSIX shared memory under one namespace; safe across processes and
    threads. Construct one per process (it holds no shared state of its own)."""

    def __init__(
        self,
        namespace: str,
        capacity: int = DEFAULT_CAPACITY,
        ttl: float = DEFAULT_TTL,
        max_sessions: int | None = None,
        max_shm_bytes: int | None = None,
    ):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.namespace = segment.validate_namespace(namespace)
        self.capacity = capacity
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.max_shm_bytes = max_shm_bytes
        self._registry_lock = segment.registry_lock_path(namespace)
        self._quota = Quota(self.namespace, max_sessions, max_shm_bytes, capacity)
        self._may_grow = None if max_shm_bytes is None else self._quota.allows_growth

    def __repr__(self) -> str:
        return f"ShmStore(namespace={self.namespace!r}, capacity={self.capacity})"

    # --- create / replace -----------------------------------------------------------------
    def create_or_replace(self, conversation_id: str, metadata: dict | None = None) -> ShmSession:
        record = {**(metadata or {}), "id": conversation_id}  # the id always wins
        name = segment.segment_name(self.namespace, conversation_id)
        pid = os.getpid()
        with flocked(self._registry_lock):
            replaced = self._retire(name, cancel=True)
            self._quota.check_creation(conversation_id)
            seg = segment.create(
                self.namespace, conversation_id, capacity=self.capacity, metadata=record,
                started_at_us=now_us(), producer_pid=pid, producer_start=process_start_time(pid),
            )
        log.info("session created id=%s replaced=%s", segment.short_hash(conversation_id),
                 "yes" if replaced else "no")
        session = ShmSession(seg, conversation_id, self._may_grow)
        session.replaced = replaced
        return session

    def restore(
        self,
        conversation_id: str,
        data: bytes,
        *,
        total: int,
        state: State,
        started_at_us: int,
        completed_at_us: int,
        metadata: dict | None = None,
        capacity: int | None = None,
    ) -> ShmSession:
        """Create a finished session holding ``data`` as its stream bytes ``[total -
        len(data), total)``, for ``shmstream load``: offsets stay those of the dumped
        session, so ``GET from=N`` answers the same (below ``total - len(data)`` it is
        OffsetLost). It has no producer (pid 0). A session with this id is replaced, as
        by :meth:`create_or_replace`.

        ``capacity`` defaults to the store's; when bytes were dropped the ring was full,
        so it must be ``len(data)``. Raises ValueError for such an inconsistency or a
        running ``state``, and what :meth:`create_or_replace` raises. Nothing is left
        behind after a failure, and no process can open the session half-restored.
        """
        capacity = self.capacity if capacity is None else capacity
        state = State(state)
        if not state.is_terminal:
            raise ValueError("a restored session must be in a terminal state")
        if capacity <= 0 or len(data) > capacity or len(data) > total:
            raise ValueError(f"{len(data)} bytes do not fit a ring of {capacity} bytes "
                             f"ending at offset {total}")
        dropped = total - len(data)
        if dropped != ring.dropped_for(total, capacity):
            raise ValueError(f"{dropped} dropped bytes need a full ring of {len(data)} "
                             f"bytes, not {capacity}")
        record = {**(metadata or {}), "id": conversation_id}
        name = segment.segment_name(self.namespace, conversation_id)
        with flocked(self._registry_lock):
            self._retire(name, cancel=True)
            self._quota.check_creation(conversation_id)
            seg = segment.create(
                self.namespace, conversation_id, capacity=capacity, metadata=record,
                started_at_us=started_at_us, producer_pid=0, producer_start=0,
            )
            try:
                q, i = seg.header.q, seg.header.i
                with seg.lock:  # filled before the registry lock lets anyone open it
                    try:
                        seg.grow(min(total, capacity))
                    except OSError as exc:
                        raise StoreUnavailable(f"no room in {segment.SHM_DIR} to restore "
                                               f"{len(data)} bytes ({exc.strerror})") from None
                    q[_TOTAL_Q] = ring.write(seg.header.ring, capacity, dropped, data)
                    q[_COMPLETED_AT_Q] = completed_at_us
                    i[_STATE_I] = state
            except BaseException:
                seg.close()
                segment.retire(self.namespace, name)
                raise
        log.info("session restored id=%s", segment.short_hash(conversation_id))
        return ShmSession(seg, conversation_id, self._may_grow)

    def _retire(self, name: str, cancel: bool) -> bool:
        """Finalize and unlink whatever lives at ``name``. Registry lock held exclusively.

        A running session is cancelled (``cancel``) or finalized as done. True if a
        session was there.
        """
        try:
            seg = segment.open_segment(self.namespace, name)
        except CorruptSegment as exc:
            log.warning("removing unusable segment %s: %s", name, exc)
            segment.retire(self.namespace, name)
            return False
        if seg is None:
            return False
        session = ShmSession(seg, "")
        try:
            if cancel:
                session.cancel()
            else:
                session.finalize(State.DONE)
        finally:
            session.close()  # first: our own mapping would keep it "in use"
            segment.retire(self.namespace, name)
        return True

    # --- finding --------------------------------------------------------------------------
    def _open(self, name: str, conversation_id: str | None) -> ShmSession | None:
        """Open by name; with ``conversation_id``, only if the stored id is that one."""
        try:
            with flocked(self._registry_lock, shared=True):
                seg = segment.open_segment(self.namespace, name)
        except CorruptSegment as exc:
            log.warning("skipping unusable segment %s: %s", name, exc)
            return None
        if seg is None:
            return None
        try:
            stored = seg.header.metadata().get("id")
        except CorruptSegment as exc:
            log.warning("skipping segment %s: %s", name, exc)
            seg.close()
            return None
        if not isinstance(stored, str) or (conversation_id is not None
                                           and stored != conversation_id):
            seg.close()  # a hash collision or a foreign record: not this session
            return None
        return ShmSession(seg, stored, self._may_grow)

    def get(self, conversation_id: str) -> ShmSession | None:
        name = segment.segment_name(self.namespace, conversation_id)
        return self._open(name, conversation_id)

    def _infos(self, names: Iterable[str]) -> list[SessionInfo]:
        infos = []
        for name in names:
            session = self._open(name, None)
            if session is None:
                continue
            try:
                infos.append(session.info())
            except CorruptSegment as exc:
                log.warning("skipping segment %s: %s", name, exc)
            finally:
                session.close()
        return infos

    def list(self) -> list[SessionInfo]:
        return self._infos(segment.list_names(self.namespace))

    def lookup(self, conversation_ids: Iterable[str]) -> list[SessionInfo]:
        requested, prefixes = [], set()
        for conversation_id in conversation_ids:
            try:
                prefixes |= segment.lookup_prefixes(self.namespace, conversation_id)
            except InvalidConversationId:
                continue
            requested.append(conversation_id)
        if not requested:
            return []
        # The index, not a listing of /dev/shm: a few entries per prefix, whatever the
        # number of sessions; exact ids by name too (a creator may have died unindexed).
        names = sorted({name for prefix in prefixes
                        for name in segment.indexed_names(self.namespace, prefix)}
                       | {segment.segment_name(self.namespace, rid) for rid in requested})
        return [
            info for info in self._infos(names)
            if any(matches_lookup(info.conversation_id, rid) for rid in requested)
        ]

    # --- removing -------------------------------------------------------------------------
    def evict(self, conversation_id: str) -> bool:
        return self._evict(conversation_id, cancel=False)

    def evict_and_cancel(self, conversation_id: str) -> bool:
        return self._evict(conversation_id, cancel=True)

    def _evict(self, conversation_id: str, cancel: bool) -> bool:
        name = segment.segment_name(self.namespace, conversation_id)
        with flocked(self._registry_lock):
            found = self._retire(name, cancel=cancel)
        if found:
            log.info("session %s id=%s", "cancelled" if cancel else "evicted",
                     segment.short_hash(conversation_id))
        return found

    def gc(self, now: float | None = None) -> GCReport:
        """One pass: expire, reap dead producers, free dead holders' locks, drop debris.

        Each segment is looked at under the registry lock (exclusive), so an unfinished
        segment can only be a dead creator's. The lock is taken per segment, not per pass:
        a pass over 10,000 sessions takes seconds, and every get() would wait that long.
        """
        now = time.time() if now is None else now
        cutoff_us = int((now - self.ttl) * 1e6)
        report = GCReport()
        for name in segment.list_names(self.namespace):
            with flocked(self._registry_lock):
                self._gc_one(name, cutoff_us, report)
        with flocked(self._registry_lock):
            for name in segment.list_orphan_semaphores(self.namespace):
                segment.unlink(name)
                report.corrupt_removed += 1
            freed = segment.collect_retired(self.namespace)
        if freed:
            log.info("gc: freed %d replaced or removed segments no process maps any more",
                     freed)
        return report

    def _gc_one(self, name: str, cutoff_us: int, report: GCReport) -> None:
        try:
            seg = segment.open_segment(self.namespace, name)
        except CorruptSegment as exc:
            if exc.unfinished:
                log.warning("gc: removing unfinished segment %s: %s", name, exc)
                segment.retire(self.namespace, name)
                report.corrupt_removed += 1
            return
        if seg is None:
            return
        if not segment.is_indexed(self.namespace, name):
            segment.add_to_index(self.namespace, name)  # its creator died before indexing
        session = ShmSession(seg, "")
        remove = False
        try:
            remove = self._collect(session, name, cutoff_us, report)
        except LockTimeout:
            # Nobody can use this session again; its readers time out too.
            log.error("gc: removing %s: its lock is stuck (holder died mid-step)", name)
            remove = True
            report.corrupt_removed += 1
        finally:
            session.close()
        if remove:
            segment.retire(self.namespace, name)

    def _collect(self, session: ShmSession, name: str, cutoff_us: int,
                 report: GCReport) -> bool:
        """Reap or expire one session; True if it is to be removed (expired)."""
        if session.segment.lock.release_if_dead_owner():
            report.locks_recovered += 1
            log.warning("gc: released the lock of %s from dead pid", name)
        state, completed, pid, start_time = session.lifecycle()
        if state is State.RUNNING and not process_alive(pid, start_time):
            if session.finalize(State.ABORTED):
                report.aborted += 1
                log.warning("session aborted id=%s producer pid %d died (gc, segment %s)",
                            _id_tag(session), pid, name)
        elif state.is_terminal and completed <= cutoff_us:
            report.expired += 1
            log.info("session expired id=%s state=%s ended %.0fs ago", _id_tag(session),
                     state.label, (cutoff_us - completed) / 1e6 + self.ttl)
            return True
        report.kept += 1
        return False

    def abort_producers(self, pids: Iterable[int] | None = None) -> int:
        """Finalize as ``aborted`` the running sessions whose producer process is dead
        (``pids`` None), or is one of ``pids`` (a worker that died or is being stopped);
        release locks held by dead processes on the way. Returns how many were aborted.

        Cheaper than :meth:`gc`: it takes the registry lock only to open each segment.
        """
        targets = None if pids is None else set(pids)
        aborted = 0
        for name in segment.list_names(self.namespace):
            session = self._open(name, None)
            if session is None:
                continue
            try:
                session.segment.lock.release_if_dead_owner()
                try:
                    state, _, pid, start_time = session.lifecycle(REAP_LOCK_TIMEOUT)
                except LockTimeout:
                    log.error("segment %s: lock stuck; left to gc", name)
                    continue
                if state is not State.RUNNING:
                    continue
                if targets is None:
                    doomed = not process_alive(pid, start_time)
                else:
                    doomed = pid in targets
                if doomed and session.finalize(State.ABORTED):
                    aborted += 1
                    log.warning("session aborted id=%s producer pid %d %s (segment %s)",
                                _id_tag(session), pid,
                                "died" if targets is None else "stopped", name)
            finally:
                session.close()
        return aborted

    def allocated_bytes(self) -> int:
        return segment.namespace_allocated_bytes(self.namespace)

    def purge(self) -> int:
        """Remove every segment, semaphore and lock file of the namespace. Returns a count."""
        with flocked(self._registry_lock):
            removed = segment.purge(self.namespace)
        for path in (segment.recovery_lock_path(self.namespace), self._registry_lock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return removed
