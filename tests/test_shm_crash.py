"""The shared-memory store killed at every step: each multi-step operation runs in a child
SIGKILLed at each of its crash points in turn (tests/crashpoints.py checks what is left),
plus the regressions of issue 13 (pid namespaces, debris, stuck locks)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import posix_ipc
import pytest
from crashpoints import (
    LOCK_RECOVERY_BOUND,
    Allowed,
    Outcome,
    check_invariants,
    run_child,
    scratch_namespace,
)
from polling import wait_for, wait_until

from shmstream import State, StoreUnavailable
from shmstream.shm import layout, segment, sync
from shmstream.shm.layout import CorruptSegment
from shmstream.shm.store import ShmStore
from shmstream.shm.sync import LockTimeout
from shmstream.store.procs import Identity

CAPACITY = 256  # small: the stream below wraps the ring
CHUNKS = [f"<{index:02d}:{'x' * 20}>".encode() for index in range(12)]
STREAM = b"".join(CHUNKS)
OLD = b"the old session's bytes"
RESTORED = bytes(range(256)) * 900  # four restore chunks
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _produce(session) -> None:
    for chunk in CHUNKS:
        session.append(chunk)
    session.finalize()


def _finished(store: ShmStore, conversation_id: str, data: bytes = OLD) -> None:
    session = store.create_or_replace(conversation_id)
    session.append(data)
    session.finalize()
    session.close()


def _in_child(body) -> None:
    """Run ``body()`` in a forked child that exits at once (a dead pid, reaped)."""
    run_child(lambda arm: body(), kill_at=None)


def _hold_and_die(namespace: str, conversation_id: str, recorded: bool) -> None:
    def body():
        session = ShmStore(namespace).get(conversation_id)
        if recorded:
            session.segment.lock.acquire()
        else:  # died between sem_wait and its record
            session.segment.semaphore.acquire()
        os._exit(0)

    _in_child(body)


# --- the operations: setup in this process, then body(arm) in the child -----------------


def op_create(namespace):
    def body(arm):
        store = ShmStore(namespace, capacity=CAPACITY)
        arm()
        _produce(store.create_or_replace("new"))
    return body, {"new": Allowed([STREAM])}, None


def op_create_or_replace(namespace):
    _finished(ShmStore(namespace, capacity=CAPACITY), "old")

    def body(arm):
        store = ShmStore(namespace, capacity=CAPACITY)
        arm()
        _produce(store.create_or_replace("old"))
    return body, {"old": Allowed([OLD, STREAM])}, None


def op_replace(namespace):
    # The session replaced belongs to a live producer: this process.
    running = ShmStore(namespace, capacity=CAPACITY).create_or_replace("live")
    running.append(OLD)

    def body(arm):
        store = ShmStore(namespace, capacity=CAPACITY)
        arm()
        _produce(store.create_or_replace("live"))

    def replaced_producer_saw_it():
        if not running.segment.still_named():
            assert running.producer_should_stop, "replaced, but its producer was not told"
        running.close()
    return body, {"live": Allowed([OLD, STREAM])}, replaced_producer_saw_it


def op_append(namespace):
    def body(arm):
        session = ShmStore(namespace, capacity=CAPACITY).create_or_replace("appended")
        arm()
        _produce(session)
    return body, {"appended": Allowed([STREAM])}, None


def op_finalize(namespace):
    def body(arm):
        session = ShmStore(namespace, capacity=CAPACITY).create_or_replace("final")
        for chunk in CHUNKS:
            session.append(chunk)
        arm()
        session.finalize()
    return body, {"final": Allowed([STREAM])}, None


def op_evict(namespace):
    store = ShmStore(namespace, capacity=CAPACITY)
    _finished(store, "done")
    running = store.create_or_replace("live")
    running.append(OLD)

    def body(arm):
        store = ShmStore(namespace, capacity=CAPACITY)
        arm()
        store.evict("done")
        store.evict_and_cancel("live")

    def cancelled_if_gone():
        if not running.segment.still_named():
            assert running.producer_should_stop, "evicted, but its producer was not told"
        running.close()
    return body, {"done": Allowed([OLD]), "live": Allowed([OLD])}, cancelled_if_gone


def op_gc(namespace):
    store = ShmStore(namespace, capacity=CAPACITY)
    _finished(store, "expired")
    _finished(store, "held")
    _hold_and_die(namespace, "held", recorded=True)
    _in_child(lambda: ShmStore(namespace, capacity=CAPACITY)
              .create_or_replace("orphaned").append(OLD))
    debris = posix_ipc.SharedMemory("/" + segment.segment_name(namespace, "debris"),
                                    posix_ipc.O_CREX)  # a creator died before fallocate
    debris.close_fd()
    posix_ipc.Semaphore("/" + segment.segment_name(namespace, "sem-only"), posix_ipc.O_CREX,
                        initial_value=1).close()

    def body(arm):
        store = ShmStore(namespace, capacity=CAPACITY, ttl=0)
        arm()
        store.gc(now=time.time() + segment.DEBRIS_GRACE + 1)
    allowed = {"expired": Allowed([OLD]), "held": Allowed([OLD]), "orphaned": Allowed([OLD])}
    return body, allowed, None


def op_restore(namespace):
    _finished(ShmStore(namespace, capacity=CAPACITY), "restored")

    def body(arm):
        store = ShmStore(namespace, capacity=len(RESTORED))
        arm()
        store.restore("restored", RESTORED, total=len(RESTORED), state=State.DONE,
                      started_at_us=1, completed_at_us=2)
    # Replaced (the old one gone) or not yet; never half-restored.
    return body, {"restored": Allowed([OLD, RESTORED], whole=True)}, None


def _recovering(recorded: bool):
    def op(namespace):
        _finished(ShmStore(namespace, capacity=CAPACITY), "locked")
        _hold_and_die(namespace, "locked", recorded=recorded)

        def body(arm):
            session = ShmStore(namespace).get("locked")
            arm()
            session.info()  # takes the lock over from the dead holder, then releases it
        return body, {"locked": Allowed([OLD])}, None
    return op


OPERATIONS = {
    "create": op_create,
    "create_or_replace": op_create_or_replace,
    "replace": op_replace,
    "append": op_append,
    "finalize": op_finalize,
    "evict": op_evict,
    "gc": op_gc,
    "restore": op_restore,
    "lock recovery (recorded holder)": _recovering(recorded=True),
    "lock recovery (unrecorded holder)": _recovering(recorded=False),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_a_kill_at_any_crash_point_leaves_a_usable_store(name):
    operation = OPERATIONS[name]
    with scratch_namespace() as namespace:
        body, _, after = operation(namespace)
        points = run_child(body, kill_at=None)
        if after:
            after()
    assert points, f"{name} reaches no crash point"
    outcome = Outcome()
    for index, point in enumerate(points):
        with scratch_namespace() as namespace:
            body, allowed, after = operation(namespace)
            reached = run_child(body, kill_at=index)
            assert reached[-1] == point, f"the crash points of {name} are not deterministic"
            try:
                check_invariants(namespace, allowed, CAPACITY, outcome)
                if after:
                    after()
            except AssertionError as exc:
                raise AssertionError(f"{name} killed at #{index} {point}: {exc}") from exc
    print(f"{name}: {len(points)} crash points, longest wait for a dead holder's lock "
          f"{max(outcome.lock_waits):.3f} s")  # shown with -s
    assert max(outcome.lock_waits) < LOCK_RECOVERY_BOUND


APPENDER = r"""
import sys
from shmstream.shm.store import ShmStore
session = ShmStore(sys.argv[1], capacity=256).create_or_replace("hot")
print("created", flush=True)
index = 0
while True:
    session.append(f"<{index:08d}>".encode())
    index += 1
"""


@pytest.mark.timeout(120)
def test_a_producer_killed_at_random_instants_of_its_hot_append_loop(namespace):
    # append's lock record and release are inlined (no crash points on the fast path):
    # kill it at arbitrary instants instead, many times, and check the same invariants.
    stream = b"".join(f"<{index:08d}>".encode() for index in range(200_000))
    outcome = Outcome()
    for attempt in range(8):
        with scratch_namespace() as scratch:
            child = subprocess.Popen([sys.executable, "-c", APPENDER, scratch],
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
            assert child.stdout.readline() == "created\n"
            # (a busy session may fail to open: issue 13 item 1, fixed on branch shmgrow)
            session = wait_for(lambda: ShmStore(scratch).get("hot"))
            target = 2000 + attempt * 997
            assert wait_until(lambda: session.segment.header.total >= target,  # noqa: B023
                              timeout=30)
            session.close()
            child.kill()
            child.wait(10)
            check_invariants(scratch, {"hot": Allowed([stream])}, 256, outcome)
    assert max(outcome.lock_waits) < LOCK_RECOVERY_BOUND


# --- item 2: identities are (scope, pid, start time) --------------------------------------


NAMESPACED_PRODUCER = r"""
import sys
from shmstream.shm.store import ShmStore
from shmstream.store.procs import Identity
session = ShmStore(sys.argv[1]).create_or_replace("contained")
session.append(b"from another pid namespace")
print(Identity.pid, Identity.scope, flush=True)
sys.stdin.readline()
"""


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.timeout(60)
def test_a_live_producer_of_another_pid_namespace_is_never_aborted(namespace):
    if not _can_unshare():
        pytest.skip("unshare --pid needs root or user namespaces")
    store = ShmStore(namespace)
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
         NAMESPACED_PRODUCER, namespace],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        pid, scope = map(int, child.stdout.readline().split())
        assert scope != Identity.scope, "the child's pid namespace got our scope"
        session = store.get("contained")
        assert session.segment.header.producer_pid == pid  # e.g. 1: alive here, by chance
        assert session.segment.header.producer_scope == scope
        assert store.abort_producers() == 0
        assert store.abort_producers([pid]) == 0  # our pid `pid` is someone else
        assert store.gc().aborted == 0
        info = session.info()
        assert info.state is State.RUNNING and info.producer_alive
        session.close()
    finally:
        child.stdin.close()
        child.wait(10)


def _foreign(namespace: str, conversation_id: str, field_q: int) -> None:
    session = ShmStore(namespace).get(conversation_id)
    session.segment.header.q[field_q] = Identity.scope ^ 0x5A5A
    session.close()


def test_a_dead_pid_of_another_scope_is_unknown_never_reaped(namespace):
    store = ShmStore(namespace)
    _in_child(lambda: ShmStore(namespace).create_or_replace("elsewhere").append(b"x"))
    _foreign(namespace, "elsewhere", layout.PRODUCER_SCOPE_Q)
    assert store.abort_producers() == 0
    assert store.gc().aborted == 0
    assert store.get("elsewhere").info().state is State.RUNNING
    # The same dead pid recorded in our own scope is reaped.
    session = store.get("elsewhere")
    session.segment.header.q[layout.PRODUCER_SCOPE_Q] = Identity.scope
    assert store.abort_producers() == 1
    session.close()


def test_a_lock_of_a_dead_holder_of_another_scope_is_never_taken_over(namespace):
    store = ShmStore(namespace)
    _finished(store, "foreign-lock")
    _hold_and_die(namespace, "foreign-lock", recorded=True)
    _foreign(namespace, "foreign-lock", layout.LOCK_OWNER_SCOPE_Q)
    session = store.get("foreign-lock")
    lock = session.segment.lock
    assert lock.release_if_dead_owner() is False
    with pytest.raises(LockTimeout):
        lock.acquire(timeout=sync.UNRECORDED_HOLD_GRACE + 0.5)
    assert session.segment.semaphore.value == 0  # still the foreign holder's
    session.segment.semaphore.release()
    session.close()


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(namespace):
    # The record names a live pid (ours) with another start time: the holder that
    # recorded it is gone, and its pid now belongs to someone else.
    store = ShmStore(namespace)
    session = store.create_or_replace("reused")
    q = session.segment.header.q
    session.segment.semaphore.acquire()
    q[layout.LOCK_OWNER_SCOPE_Q] = Identity.scope
    q[layout.LOCK_OWNER_Q] = layout.owner_word(Identity.pid, Identity.start + 1)
    assert session.segment.lock.release_if_dead_owner() is True
    assert session.segment.semaphore.value == 1
    session.close()


# --- item 3: debris ---------------------------------------------------------------------


def test_a_zero_byte_object_never_fills_the_quota_and_gc_removes_it(namespace):
    debris = posix_ipc.SharedMemory("/" + segment.segment_name(namespace, "debris"),
                                    posix_ipc.O_CREX)  # killed before fallocate
    debris.close_fd()
    store = ShmStore(namespace, max_sessions=1)
    assert ShmStore(namespace).gc().corrupt_removed == 0  # young: its creator may be at work
    session = store.create_or_replace("real")  # the debris does not count (and is removed)
    with pytest.raises(StoreUnavailable):
        store.create_or_replace("second")
    session.close()
    assert store.evict("real")
    debris = posix_ipc.SharedMemory("/" + segment.segment_name(namespace, "debris"),
                                    posix_ipc.O_CREX)
    debris.close_fd()
    assert store.gc(now=time.time() + segment.DEBRIS_GRACE + 1).corrupt_removed == 1
    assert segment.list_names(namespace) == []


def test_an_error_inside_initialise_propagates_and_leaves_nothing(namespace, monkeypatch):
    def failing(self, **fields):
        raise RuntimeError("initialise failed")

    monkeypatch.setattr(layout.Header, "initialise", failing)
    with pytest.raises(RuntimeError, match="initialise failed"):  # not BufferError
        ShmStore(namespace).create_or_replace("doomed")
    assert segment.list_names(namespace) == []
    assert segment.list_orphan_semaphores(namespace) == []


def test_a_restore_is_never_visible_half_made(namespace, monkeypatch):
    store = ShmStore(namespace, capacity=len(RESTORED))
    name = segment.segment_name(namespace, "half")
    seen = []

    def hook(point):
        if point == "restore.chunk":  # midway: what an opener would find (were it let in)
            try:
                seen.append(segment.open_segment(namespace, name))
            except CorruptSegment as exc:
                seen.append("unfinished" if exc.unfinished else str(exc))

    monkeypatch.setattr("shmstream.store.faults.hook", hook)
    restored = store.restore("half", RESTORED, total=len(RESTORED), state=State.DONE,
                             started_at_us=1, completed_at_us=2)
    monkeypatch.setattr("shmstream.store.faults.hook", None)
    assert seen and seen == ["unfinished"] * len(seen)
    assert b"".join(store.get("half").read(0)) == RESTORED
    restored.close()


# --- item 4: stuck locks ------------------------------------------------------------------


def test_a_holder_killed_between_clearing_its_record_and_posting_is_recovered(namespace):
    store = ShmStore(namespace)
    _finished(store, "w2")

    def body(arm):
        session = ShmStore(namespace).get("w2")
        session.segment.lock.acquire()
        arm()
        session.segment.lock.release()  # killed at its only point: cleared, not posted

    assert run_child(body, kill_at=0) == ["lock.cleared-unposted"]
    session = store.get("w2")
    started = time.monotonic()
    assert session.info().total_bytes == len(OLD)
    assert time.monotonic() - started < LOCK_RECOVERY_BOUND
    assert session.segment.semaphore.value == 1
    session.close()


def _holder(namespace: str, conversation_id: str, ready, release) -> None:
    def body(arm):
        session = ShmStore(namespace).get(conversation_id)
        with session.segment.lock:
            os.write(ready, b"held\n")
            os.read(release, 1)

    run_child(body, kill_at=None)


@pytest.mark.timeout(60)
def test_gc_waiting_on_a_stuck_lock_blocks_no_open_or_create(namespace):
    store = ShmStore(namespace)
    _finished(store, "stuck")
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    holder = threading.Thread(target=_holder, args=(namespace, "stuck", ready_w, release_r))
    holder.start()
    try:
        assert os.read(ready_r, 5) == b"held\n"
        gc = threading.Thread(target=store.gc)
        gc.start()
        assert wait_until(lambda: "lifecycle" in _stack_of(gc), timeout=10)
        started = time.monotonic()
        other = store.create_or_replace("other")  # needs the registry flock exclusively
        assert store.get("other") is not None
        assert gc.is_alive(), "gc did not wait on the stuck lock"
        assert time.monotonic() - started < 5.0
        other.close()
    finally:
        os.write(release_w, b"x")
        holder.join(10)
    gc.join(20)
    for fd in (ready_r, ready_w, release_r, release_w):
        os.close(fd)


def _stack_of(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return " ".join(names)


def test_the_supervisors_probe_never_takes_a_free_lock(namespace):
    # Regression: release_if_dead_owner took the semaphore to probe it, unrecorded: a
    # supervisor killed there (it probes every segment every 0.5 s) left it stuck.
    store = ShmStore(namespace)
    session = store.create_or_replace("probed")
    lock = session.segment.lock
    hold_key = lock.holder()[3]
    assert lock.release_if_dead_owner() is False
    assert lock.holder()[3] == hold_key, "the probe took the lock"
    session.close()


def test_every_kind_of_hold_moves_the_hold_key(namespace):
    # The unrecorded-hold rule takes over only when one hold key stays unrecorded for the
    # grace: an append moves it with its doorbell bump, every other hold with the holds
    # counter, and an append refused by a finished session with the counter too.
    store = ShmStore(namespace)
    session = store.create_or_replace("keys")
    lock = session.segment.lock
    keys = [lock.holder()[3]]
    session.append(b"x")  # the inlined record
    keys.append(lock.holder()[3])
    session.info()  # a read under RobustLock.record
    keys.append(lock.holder()[3])
    session.finalize()
    keys.append(lock.holder()[3])
    assert session.append(b"late") is False
    keys.append(lock.holder()[3])
    assert len(set(keys)) == len(keys), keys
    assert lock.holder()[:3] == (0, 0, Identity.scope)  # released: no owner, scope kept
    session.close()
