"""Upkeep of a shared-memory namespace: gc (debris, dead holders' locks, dead producers,
expiry) and the supervisor's cheaper dead-producer reaping.

The registry lock is held exclusively only for steps that never wait on a session lock
(removing debris, unlinking a name that still refers to the segment examined), so a stuck
session lock never blocks other processes' opens and creates.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable

from shmstream.shm import segment
from shmstream.shm.layout import CorruptSegment
from shmstream.shm.store import REAP_LOCK_TIMEOUT, ShmSession, ShmStore
from shmstream.shm.sync import Liveness, LockTimeout, flocked
from shmstream.store import faults
from shmstream.store.interface import GCReport
from shmstream.store.procs import liveness, producer_doomed
from shmstream.store.states import State

log = logging.getLogger("shmstream.store")


def gc(store: ShmStore, now: float | None = None) -> GCReport:
    """One pass: drop debris, free dead holders' locks, reap dead producers, expire.

    The registry lock is held exclusively only for steps that never wait on a session
    lock (removing debris, unlinking a name that still refers to the segment examined),
    so a stuck session lock never blocks other processes' opens and creates.
    """
    now = time.time() if now is None else now
    cutoff_us = int((now - store.ttl) * 1e6)
    report = GCReport()
    registry = segment.registry_lock_path(store.namespace)
    names = segment.list_names(store.namespace)
    for name in names:  # the registry lock per segment: get() never waits for a whole pass
        with flocked(registry):
            age = segment.unfinished_age(name, now)
            if age is not None and age >= segment.DEBRIS_GRACE:
                log.warning("gc: removing unfinished segment %s (%.0f s old)", name, age)
                segment.retire(store.namespace, name)
                report.corrupt_removed += 1
            elif age is None and not segment.is_indexed(store.namespace, name):
                with contextlib.suppress(FileNotFoundError):  # its creator died before
                    segment.add_to_index(store.namespace, name)  # indexing it
    with flocked(registry):
        for name in segment.list_orphan_semaphores(store.namespace):
            segment.unlink(name)
            report.corrupt_removed += 1
    if faults.hook is not None:
        faults.hook("gc.debris-done")
    for name in names:
        session = open_any(store, name)
        if session is None:
            continue
        try:
            _collect(store, session, name, cutoff_us, report)
        except LockTimeout:
            # Nobody can use this session again; its readers time out too.
            if unlink_if_current(store, session):
                log.error("gc: removed %s: its lock is stuck (a live holder hangs, or "
                          "one of another pid namespace died)", name)
                report.corrupt_removed += 1
        finally:
            session.close()
    with flocked(registry):
        freed = segment.collect_retired(store.namespace)
        # What the session quota counts by, set right once a pass (a creator killed
        # between its segment and its index entry left it one off).
        segment.set_indexed_count(store.namespace, len(segment.list_names(store.namespace)))
    if freed:
        log.info("gc: freed %d replaced or removed segments no process maps any more", freed)
    return report


def open_any(store: ShmStore, name: str) -> ShmSession | None:
    """Open ``name`` whatever id it stores (gc, reaping); None if gone or unusable."""
    try:
        with flocked(segment.registry_lock_path(store.namespace), shared=True):
            seg = segment.open_segment(store.namespace, name)
    except CorruptSegment:
        return None  # unfinished: gc removes it after its grace; foreign: not ours
    return None if seg is None else ShmSession(seg, "")


def unlink_if_current(store: ShmStore, session: ShmSession) -> bool:
    """Retire the session's name if it still refers to this session's segment (not to a
    newer one created meanwhile). True if it did."""
    with flocked(segment.registry_lock_path(store.namespace)):
        if not session.segment.still_named():
            return False
        segment.retire(store.namespace, session.segment.name)
        return True


def _collect(store: ShmStore, session: ShmSession, name: str, cutoff_us: int,
             report: GCReport) -> None:
    if session.segment.lock.release_if_dead_owner():
        report.locks_recovered += 1
        log.warning("gc: released the lock of %s from a dead holder", name)
    state, completed, producer, pid = session.lifecycle()
    if state is State.RUNNING and producer is Liveness.DEAD:
        if session.finalize(State.ABORTED):
            report.aborted += 1
            log.warning("session aborted id=%s producer pid %d died (gc, segment %s)",
                        _id_tag(session), pid, name)
    elif state.is_terminal and completed <= cutoff_us:
        tag = _id_tag(session)
        if unlink_if_current(store, session):
            report.expired += 1
            log.info("session expired id=%s state=%s ended %.0fs ago", tag, state.label,
                     (cutoff_us - completed) / 1e6 + store.ttl)
            return
    report.kept += 1


def abort_producers(store: ShmStore, pids: Iterable[int] | None = None) -> int:
    """Finalize as ``aborted`` the running sessions whose producer process is dead
    (``pids`` None), or is one of ``pids`` of our pid namespace (a worker that died or
    is being stopped); release locks held by dead processes on the way. A producer of
    another pid namespace is never judged dead here. Returns how many were aborted.

    Cheaper than :meth:`gc`: it takes the registry lock only to open each segment. A
    process that calls it again and again uses a :class:`Reaper`.
    """
    return Reaper(store).run(pids)


class Reaper:
    """:func:`abort_producers` for a process that runs it again and again (the supervisor,
    every 0.5 s). It remembers, by name and inode (a session never runs again; a
    replacement is a new inode), the segments it found ended, which it never opens again,
    and the producer of each running one, which it opens again only once that producer
    is doomed (dead, or one of ``pids``): a pass costs one directory listing and one
    liveness check per producer process, not an open, a locked read and a close per
    session (that was ~20 us of supervisor CPU per relayed event at 300 streams). A new
    session is met with one pread of its header (:func:`segment.glance`), not a mapping,
    a semaphore and its lock: a terminal state is final, and the producer's identity is
    written before the header is marked finished, so neither needs the lock (the
    mapping path was two thirds of the reaper's CPU at 1,000 streams ramped in 2 s). And
    while /dev/shm's mtime says no name came, went or was replaced, a pass lists nothing:
    it checks the known producers' liveness alone (the listing was the rest of it).

    It keeps no segment mapped between passes: a segment mapped anywhere when it is
    deleted or replaced is retired, and its pages stay taken until gc (a DELETE right
    after an answer ended then left a full /dev/shm full). Nor does it probe the locks of
    running sessions whose producer lives: their producer and readers recover a dead
    holder's lock themselves on their next hold, and gc frees the rest."""

    # An unchanged /dev/shm mtime is trusted only if it was this much older than the
    # listing it was read with: a name added within the timestamps' granularity (a jiffy
    # on a coarse clock) of the read could leave the mtime as it was (git's "racy" rule).
    RACY_NS = 1_000_000_000

    def __init__(self, store: ShmStore):
        self.store = store
        self._ended: set[tuple[str, int]] = set()
        self._producers: dict[tuple[str, int], tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        self._listed_mtime: int | None = None  # /dev/shm's mtime at the last full listing
        self._listed_at = 0  # time.time_ns() at that listing

    def run(self, pids: Iterable[int] | None = None) -> int:
        targets = None if pids is None else set(pids)
        with self._lock:
            now, mtime = time.time_ns(), segment.directory_mtime_ns()  # before any listing
            unchanged = mtime is not None and mtime == self._listed_mtime and \
                mtime < self._listed_at - self.RACY_NS
            if unchanged and not any(
                    producer_doomed(liveness(*producer), producer[0], targets)
                    for producer in set(self._producers.values())):
                return 0  # no new, removed or replaced session, and no producer doomed
            self._listed_at, self._listed_mtime = now, mtime
            return self._full_pass(targets)

    def _full_pass(self, targets: set[int] | None) -> int:
        aborted = 0
        present = segment.list_name_inodes(self.store.namespace)
        self._ended = {key for key in self._ended if present.get(key[0]) == key[1]}
        self._producers = {key: producer for key, producer in self._producers.items()
                           if present.get(key[0]) == key[1]}
        judged: dict[tuple[int, int, int], Liveness] = {}  # producer -> liveness
        for name, inode in present.items():
            key = (name, inode)
            if key in self._ended:
                continue
            producer = self._producers.get(key)
            if producer is None:  # a new session: one pread tells most of them apart
                seen = segment.glance(name)
                if seen is None or seen[0] != inode:
                    continue  # gone or replaced since the listing (its mtime changed)
                if seen[1] is not None and seen[1].state.is_terminal:
                    self._ended.add(key)  # final: no lock needed to believe it
                    continue
                if seen[1] is not None:
                    producer = self._producers[key] = seen[1].producer
            if producer is not None:
                if producer not in judged:
                    judged[producer] = liveness(*producer)
                if not producer_doomed(judged[producer], producer[0], targets):
                    continue  # still running or ended: either way nothing to abort
            session = open_any(self.store, name)
            if session is None:
                # Unfinished (its creator may finish it without touching /dev/shm again)
                # or foreign: list again next pass rather than miss its producer.
                self._listed_mtime = None
                continue
            try:
                running, killed = self._reap(session, name, targets)
                key = (name, session.segment.inode)
                if running:
                    # written once, before the marker
                    self._producers[key] = session.segment.header.producer
                else:
                    self._ended.add(key)
                    self._producers.pop(key, None)
            finally:
                session.close()
            aborted += killed
        return aborted

    @staticmethod
    def _reap(session: ShmSession, name: str, targets: set[int] | None) -> tuple[bool, int]:
        """(whether the session still runs, how many were aborted: 0 or 1)."""
        session.segment.lock.release_if_dead_owner()
        try:
            state, _, producer, pid = session.lifecycle(REAP_LOCK_TIMEOUT)
        except LockTimeout:
            log.error("segment %s: lock stuck; left to gc", name)
            return True, 0
        if state is not State.RUNNING:
            return False, 0
        if producer_doomed(producer, pid, targets) and session.finalize(State.ABORTED):
            log.warning("session aborted id=%s producer pid %d %s (segment %s)",
                        _id_tag(session), pid,
                        "died" if targets is None else "stopped", name)
            return False, 1
        return True, 0


def _id_tag(session: ShmSession) -> str:
    """The log handle of a session opened without its id (gc): the stored id's hash."""
    try:
        stored = session.segment.header.metadata().get("id")
    except CorruptSegment:
        return "unknown"
    return segment.short_hash(stored) if isinstance(stored, str) else "unknown"
