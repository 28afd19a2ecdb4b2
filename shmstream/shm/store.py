"""The shared-memory backend: sessions in /dev/shm, visible to every process on the host.

Locking order, always: the namespace's registry flock, then a segment's semaphore. The
registry flock is taken exclusively to create, replace or remove a name, and shared to open
one, so a name never resolves to a half-made or half-removed pair of shm + semaphore.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from time import perf_counter_ns

from posix_ipc import BusyError

from shmstream.shm import layout, segment, waiter
from shmstream.shm.layout import FLAG_CANCEL, FLAG_RING_CAPPED, CorruptSegment
from shmstream.shm.quota import Quota, pages
from shmstream.shm.sync import (
    STUCK_LOCK_TIMEOUT,
    Identity,
    Liveness,
    OwnerStamp,
    flocked,
    liveness,
)
from shmstream.store import faults, ring
from shmstream.store.errors import OffsetLost
from shmstream.store.ids import LookupRequest
from shmstream.store.interface import (
    DEFAULT_CAPACITY,
    DEFAULT_TTL,
    WAKE_INTERVAL,
    GCReport,
    Session,
    SessionInfo,
    SessionStore,
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
_LOCK_HOLDS_Q = layout.LOCK_HOLDS_Q
_LOCK_OWNER_SCOPE_Q = layout.LOCK_OWNER_SCOPE_Q
_WRITE_END_Q = layout.WRITE_END_Q
_NEVER = 1 << 62  # a stream offset no session reaches


def _held_from(total: int, write_end: int, capacity: int) -> int:
    """The oldest stream offset still held intact: an append that started (``write_end``
    stored) may have overwritten up to ``write_end - capacity`` before publishing."""
    return max(0, min(max(total, write_end) - capacity, total))


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
        # The stream offset up to which the ring has pages, as this handle last saw it
        # (`allocated` only rises, so a stale value only costs a needless _make_room);
        # past the cap, never: the ring wraps instead of growing.
        self._grown_to = 0
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
        # RobustLock.record inlined: scope, then the owner word completes the record. The
        # holds counter is left alone: this hold's key moves with the doorbell bump below.
        scope, owner = OwnerStamp.record
        q[_LOCK_OWNER_SCOPE_Q] = scope
        q[_LOCK_OWNER_Q] = owner
        try:
            if i[_STATE_I] != _RUNNING:
                q[_LOCK_HOLDS_Q] += 1  # no doorbell bump on this path: move the key here
                return False
            total = q[_TOTAL_Q]
            end_total = total + length
            if end_total > self._grown_to:
                self._make_room(end_total)
            capacity = q[_CAPACITY_Q]
            if end_total <= capacity:  # not wrapped yet: offset o sits at index o
                self._ring[total:end_total] = data
            else:
                # The copy overwrites the oldest held bytes: declare them lost first, so
                # an appender killed before it publishes `total` leaves no altered byte
                # held (see _held_from).
                q[_WRITE_END_Q] = end_total
                position = total % capacity
                end = position + length
                if end <= capacity:
                    self._ring[position:end] = data
                else:
                    ring.write(self._ring, capacity, total, data)
                    if faults.hook is not None:  # the slow path only: the fast one costs 0
                        faults.hook("append.wrapped-unpublished")
            q[_TOTAL_Q] = end_total  # publish the bytes, then ring the doorbell
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
        allocated = self._q[_ALLOCATED_Q]
        self._grown_to = _NEVER if allocated >= self._q[_CAPACITY_Q] else allocated

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
        return self._info_and_held(0)[0]

    def read_held(self, limit: int | None = None) -> tuple[SessionInfo, bytes]:
        # Header and bytes in one lock hold: a producer lapping a small ring between two
        # holds would otherwise drop the first bytes before any were copied.
        return self._info_and_held(limit)

    def _info_and_held(self, limit: int | None) -> tuple[SessionInfo, bytes]:
        """The session's info and its held bytes from ``dropped_bytes`` on (at most
        ``limit``; 0 copies none), read in one lock hold."""
        header = self.segment.header
        with self._lock:  # fields read together, never combined with unlocked reads
            state = header.state
            total = header.total
            capacity = header.capacity
            write_end = header.write_end
            allocated = header.allocated
            capped = bool(header.flags & FLAG_RING_CAPPED)
            started = header.started_at_us
            completed = header.completed_at_us
            pid = header.producer_pid
            start_time = header.producer_start
            scope = header.producer_scope
            waiters = header.waiters
            held_from = _held_from(total, write_end, capacity)
            held = b"" if limit == 0 else ring.read(self._ring, capacity, total, held_from,
                                                     limit)
        info = SessionInfo(
            conversation_id=self.conversation_id,
            state=state,
            total_bytes=total,
            dropped_bytes=held_from,
            capacity=capacity,
            started_at=started / 1e6,
            completed_at=completed / 1e6,
            producer_pid=pid,
            # Another pid namespace's producer cannot be proven dead: presumed alive.
            producer_alive=liveness(pid, start_time, scope) is not Liveness.DEAD,
            waiters=waiters,
            metadata=header.metadata(),
            allocated_bytes=pages(header.ring_offset + allocated),
            ring_capped=capped,
        )
        return info, held

    def metadata(self) -> dict:
        # Written before the segment was marked ready and never again: no lock needed.
        return self.segment.header.metadata()

    def reopen(self) -> ShmSession:
        # The mapping stays valid after the name is unlinked (replace, evict): share it.
        return ShmSession(self.segment.retain(), self.conversation_id, self._may_grow)

    def lifecycle(self, timeout: float = STUCK_LOCK_TIMEOUT) -> tuple[State, int, Liveness, int]:
        """(state, completed_at_us, producer liveness, producer pid), read together under
        the lock: what gc and reaping decide on. Raises LockTimeout after ``timeout``."""
        header = self.segment.header
        self._lock.acquire(timeout)
        try:
            state, completed = header.state, header.completed_at_us
            producer = header.producer
        finally:
            self._lock.release()
        return state, completed, liveness(*producer), producer[0]

    def _poll(self, offset: int, limit: int | None) -> tuple[bytes, bool]:
        q, i, lock = self._q, self._i, self._lock
        lock.acquire()
        try:
            total = q[_TOTAL_Q]
            finished = i[_STATE_I] != _RUNNING
            capacity = q[_CAPACITY_Q]
            if offset < _held_from(total, q[_WRITE_END_Q], capacity):
                raise OffsetLost()  # overwritten by an append whose appender died midway
            chunk = ring.read(self._ring, capacity, total, offset, limit)
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
              limit: int | None = None, doorbell=None):
        # An event-loop reader never spins (that would hold the GIL) and never arms a futex
        # wait of its own: the process's one waiter per session wakes it (shm/waiter.py).
        self._evented = True
        return super().aread(offset, wake_interval, limit, doorbell)

    async def _await_change(self, timeout: float) -> None:
        await waiter.hub().wait(self.segment, self._ticket, timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ring = None
            self.segment.close()


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
        self._reaper = None  # upkeep.Reaper, made by abort_producers(repeated=True)
        self._registry_lock = segment.registry_lock_path(namespace)
        self._quota = Quota(self.namespace, max_sessions, max_shm_bytes, capacity)
        self._may_grow = None if max_shm_bytes is None else self._quota.allows_growth

    def __repr__(self) -> str:
        return f"ShmStore(namespace={self.namespace!r}, capacity={self.capacity})"

    # --- create / replace -----------------------------------------------------------------
    def create_or_replace(self, conversation_id: str, metadata: dict | None = None) -> ShmSession:
        record = {**(metadata or {}), "id": conversation_id}  # the id always wins
        name = segment.segment_name(self.namespace, conversation_id)
        with flocked(self._registry_lock):
            replaced = self._retire(name, cancel=True)
            self._quota.check_creation(conversation_id)
            seg = segment.create(
                self.namespace, conversation_id, capacity=self.capacity, metadata=record,
                started_at_us=now_us(), producer_pid=Identity.pid,
                producer_start=Identity.start, producer_scope=Identity.scope,
            )
        # DEBUG: a relay's "session started" line says the same (with replaced=), and an
        # INFO line per session is a measurable share of a stream's setup.
        log.debug("session created id=%s replaced=%s", segment.short_hash(conversation_id),
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

        def fill(header: layout.Header) -> None:
            # Before the ready marker: a restorer killed midway leaves an unfinished
            # object for gc, never a half-restored session others could open.
            q, i = header.q, header.i
            q[_TOTAL_Q] = dropped
            for start in range(0, len(data), 64 * 1024):
                q[_TOTAL_Q] = ring.write(header.ring, capacity, q[_TOTAL_Q],
                                         data[start:start + 64 * 1024])
                if faults.hook is not None:
                    faults.hook("restore.chunk")
            q[_COMPLETED_AT_Q] = completed_at_us
            i[_STATE_I] = state

        with flocked(self._registry_lock):
            self._retire(name, cancel=True)
            self._quota.check_creation(conversation_id)
            seg = segment.create(
                self.namespace, conversation_id, capacity=capacity, metadata=record,
                started_at_us=started_at_us, producer_pid=0, producer_start=0,
                reserve=min(total, capacity), fill=fill,
            )
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
        request = LookupRequest.parse(conversation_ids)
        if not request.requested:
            return []
        # The index, not a listing of /dev/shm: a few entries per prefix, whatever the
        # number of sessions; exact ids by name too (a creator may have died unindexed).
        prefixes = {segment.base_prefix(self.namespace, base) for base in request.bases}
        names = sorted({name for prefix in prefixes
                        for name in segment.indexed_names(self.namespace, prefix)}
                       | {segment.segment_name(self.namespace, rid)
                          for rid in request.requested})
        return [info for info in self._infos(names) if request.matches(info.conversation_id)]

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
        """One pass: drop debris, free dead holders' locks, reap dead producers, expire.
        See :func:`shmstream.shm.upkeep.gc`."""
        from shmstream.shm import upkeep  # it builds on this module

        return upkeep.gc(self, now)

    def abort_producers(self, pids: Iterable[int] | None = None, repeated: bool = False
                        ) -> int:
        """See :func:`shmstream.shm.upkeep.abort_producers`; ``repeated`` keeps a
        :class:`~shmstream.shm.upkeep.Reaper`, which skips the sessions it found ended."""
        from shmstream.shm import upkeep

        if not repeated:
            return upkeep.abort_producers(self, pids)
        if self._reaper is None:
            self._reaper = upkeep.Reaper(self)
        return self._reaper.run(pids)

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
