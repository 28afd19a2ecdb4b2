"""Shared-memory specifics, across real processes: exact bytes under fan-out, racing
replacement, lock recovery after SIGKILL, dead producers, lost wake-ups, a full /dev/shm,
permissions, corrupt segments and the polling doorbell.

Child processes are forked (``multiprocessing`` "fork" context) and always reaped; every
wait has a timeout, so a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from polling import wait_until

from shmstream import State, StoreUnavailable
from shmstream.shm import layout, segment, sync
from shmstream.shm.store import ShmStore
from shmstream.shm.sync import Doorbell

CTX = multiprocessing.get_context("fork")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def processes():
    """Start children with ``start(target, *args)``; all are killed if still running and
    reaped (joined) on the way out, so none is left a zombie."""
    started: list = []

    def start(target, *args):
        process = CTX.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.is_alive():
                process.kill()
        for process in started:
            process.join(10)
        assert not any(p.is_alive() for p in started), "a child process could not be reaped"


def take(results: multiprocessing.Queue, count: int, timeout: float) -> list:
    """``count`` results, or fail once ``timeout`` seconds passed in total."""
    deadline = time.monotonic() + timeout
    got = []
    while len(got) < count:
        remaining = deadline - time.monotonic()
        try:
            got.append(results.get(timeout=max(0.01, remaining)))
        except queue.Empty:
            pytest.fail(f"only {len(got)} of {count} child results within {timeout} s")
    return got


def events(seed: int, count: int, max_size: int):
    """The deterministic event stream every process can regenerate from ``seed``."""
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.randbytes(rng.randrange(max_size + 1))


def namespace_entries(namespace: str) -> list[str]:
    """The namespace's segments and semaphores (its two small lock files and the lookup
    index folder excluded)."""
    return sorted(e for e in os.listdir(segment.SHM_DIR)
                  if e.startswith((namespace + ".", "sem." + namespace + "."))
                  and not e.endswith((".lock", ".recover", ".index")))


# --- (a) one producer, eight readers, exact bytes -------------------------------------------

FAN_SEED = 20240611
FAN_EVENTS = 100_000
FAN_MAX_EVENT = 256
FAN_CAPACITY = 16 * 1024 * 1024  # > 100k * 256 / 2 on average: nothing is dropped


def _fan_producer(namespace: str, conversation_id: str, results) -> None:
    store = ShmStore(namespace, capacity=FAN_CAPACITY)
    session = store.get(conversation_id)
    appended = all(session.append(chunk)
                   for chunk in events(FAN_SEED, FAN_EVENTS, FAN_MAX_EVENT))
    session.finalize()
    results.put(("producer", appended, session.info().total_bytes))
    session.close()


def _fan_reader(namespace: str, conversation_id: str, index: int, offset, results) -> None:
    store = ShmStore(namespace, capacity=FAN_CAPACITY)
    session = store.get(conversation_id)
    if offset == "late":  # anywhere up to a little beyond what exists right now
        offset = random.Random(index).randrange(session.info().total_bytes + 50_000)
    expected = memoryview(b"".join(events(FAN_SEED, FAN_EVENTS, FAN_MAX_EVENT)))
    position, mismatch = offset, None
    deadline = time.monotonic() + 50
    for chunk in session.read(offset, should_stop=lambda: time.monotonic() > deadline):
        if expected[position : position + len(chunk)] != chunk:
            mismatch = position
            break
        position += len(chunk)
    results.put((index, offset, position, mismatch, len(expected)))
    session.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_one_producer_eight_readers_get_exactly_the_producers_bytes(namespace):
    store = ShmStore(namespace, capacity=FAN_CAPACITY)
    session = store.create_or_replace("fan")
    expected_total = sum(len(c) for c in events(FAN_SEED, FAN_EVENTS, FAN_MAX_EVENT))
    results = CTX.Queue()
    early_offsets = [0, 0, 12_345, expected_total - 1000]
    with processes() as start:
        for index, offset in enumerate(early_offsets):
            start(_fan_reader, namespace, "fan", index, offset, results)
        # The early readers are attached and asleep before the first byte is produced.
        assert wait_until(lambda: session.info().waiters >= len(early_offsets)), \
            "early readers did not block"
        producer = start(_fan_producer, namespace, "fan", results)
        index = len(early_offsets)
        for fraction in (0.1, 0.1, 0.5, 0.5):
            wait_until(lambda f=fraction: session.info().total_bytes >= f * expected_total,
                       timeout=30, interval=0.002)
            start(_fan_reader, namespace, "fan", index, "late", results)
            index += 1
        got = take(results, 1 + index, timeout=90)
        producer.join(10)
    produced = [r for r in got if r[0] == "producer"]
    assert produced == [("producer", True, expected_total)]
    readers = sorted(r for r in got if r[0] != "producer")
    assert len(readers) == 8
    for reader_index, offset, position, mismatch, length in readers:
        assert mismatch is None, f"reader {reader_index} from {offset} differs at {mismatch}"
        assert length == expected_total
        assert position == max(offset, expected_total), f"reader {reader_index} stopped early"
    info = session.info()
    assert info.state is State.DONE and info.dropped_bytes == 0 and info.waiters == 0
    assert session.segment.semaphore.value == 1  # the lock ended free, not over-released
    session.close()


# --- (b) racing create_or_replace -----------------------------------------------------------


def _replacer(namespace: str, rounds: int, barrier, results) -> None:
    store = ShmStore(namespace, capacity=4096)
    barrier.wait(10)
    previous, problems = None, []
    for round_number in range(rounds):
        session = store.create_or_replace("contested", {"round": round_number})
        session.append(b"x")  # False if another process replaced it already: fine
        if previous is not None:
            # Whoever replaced it, the previous session must be cancelled for good.
            if previous.append(b"y"):
                problems.append("previous session still accepted bytes")
            if previous.info().state is not State.CANCELLED:
                problems.append(f"previous session is {previous.info().state.label}")
            previous.close()
        previous = session
    previous.close()
    results.put(problems)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_racing_create_or_replace_leaves_exactly_one_live_session(namespace):
    workers, rounds = 4, 250
    barrier = CTX.Barrier(workers)
    results = CTX.Queue()
    with processes() as start:
        for _ in range(workers):
            start(_replacer, namespace, rounds, barrier, results)
        outcomes = take(results, workers, timeout=90)
    assert outcomes == [[]] * workers
    store = ShmStore(namespace, capacity=4096)
    infos = store.list()
    assert len(infos) == 1
    assert infos[0].conversation_id == "contested" and infos[0].state is State.RUNNING
    assert segment.list_orphan_semaphores(namespace) == []
    assert len(segment.list_names(namespace)) == 1
    live = store.get("contested")
    assert live.info().state is State.RUNNING
    live.close()


# --- (c) a lock holder SIGKILLed inside the lock --------------------------------------------


def _lock_holder(namespace: str, conversation_id: str, results) -> None:
    session = ShmStore(namespace).get(conversation_id)
    session.segment.lock.acquire()
    results.put(("held", os.getpid()))
    time.sleep(60)


def _lock_contender(namespace: str, conversation_id: str, index: int, rounds: int, barrier,
                    shared, results) -> None:
    """Take the lock ``rounds`` times; inside, check that nobody else is inside.

    Even-numbered contenders race the takeover head-on: they spin on
    ``recover_from_dead_owner`` so several of them see the holder's death within
    microseconds of each other. Odd ones just block in ``acquire``.
    """
    session = ShmStore(namespace).get(conversation_id)
    lock = session.segment.lock
    dead_holder = lock.owner_pid
    barrier.wait(10)
    first_hold, violations, recovered = None, 0, False
    if index % 2 == 0:
        deadline = time.monotonic() + 5
        while lock.owner_pid == dead_holder and time.monotonic() < deadline:
            if lock.recover_from_dead_owner():  # records us as the owner
                recovered = True
                break
    for round_number in range(rounds):
        if not (recovered and round_number == 0):
            lock.acquire(timeout=10)
        try:
            if first_hold is None:
                first_hold = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
            if shared[0] != 0:
                violations += 1
            shared[0] = index + 1
            count = shared[1]  # a read-modify-write that loses updates if two are inside
            if round_number == 0 or round_number % 16 == 0:
                time.sleep(0.002)
            shared[1] = count + 1
            if shared[0] != index + 1:
                violations += 1
            shared[0] = 0
        finally:
            lock.release()
    results.put((index, first_hold, violations))
    session.close()


@pytest.mark.timeout(60)
def test_a_lock_held_by_a_killed_process_is_recovered_by_exactly_one_waiter(namespace):
    store = ShmStore(namespace, capacity=4096)
    session = store.create_or_replace("locked")
    contenders, rounds = 6, 150
    barrier = CTX.Barrier(contenders + 1)
    shared = CTX.RawArray("q", 2)
    results = CTX.Queue()
    with processes() as start:
        holder = start(_lock_holder, namespace, "locked", results)
        assert take(results, 1, timeout=10)[0] == ("held", holder.pid)
        blockers = []
        for index in range(contenders):
            process = start(_lock_contender, namespace, "locked", index, rounds, barrier,
                            shared, results)
            if index % 2:
                blockers.append(process)
        barrier.wait(10)
        # The blocking contenders are queued on the held semaphore (asleep in the kernel).
        assert wait_until(lambda: all(_asleep(c.pid) for c in blockers), timeout=20)
        assert session.segment.lock.owner_pid == holder.pid
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        holder.join(5)
        outcomes = take(results, contenders, timeout=30)
    first_holds = [first for _, first, _ in outcomes]
    assert min(first_holds) - killed_at < 1.0, "nobody recovered the lock within 1 s"
    assert [violations for _, _, violations in outcomes] == [0] * contenders
    assert shared[1] == contenders * rounds, "two processes were inside the lock at once"
    assert shared[0] == 0
    assert session.segment.semaphore.value == 1, "the semaphore was released one time too many"
    session.segment.lock.acquire(timeout=1)
    session.segment.lock.release()
    session.close()


def test_gc_releases_a_lock_held_by_a_dead_process(namespace):
    store = ShmStore(namespace, capacity=4096)
    session = store.create_or_replace("gc-lock")
    results = CTX.Queue()
    with processes() as start:
        holder = start(_lock_holder, namespace, "gc-lock", results)
        take(results, 1, timeout=10)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(5)
    report = store.gc()
    assert report.locks_recovered == 1
    assert session.segment.semaphore.value == 1
    assert store.gc().locks_recovered == 0  # a free lock is left alone
    assert session.append(b"after") is True
    assert session.info().state is State.RUNNING  # this process, its producer, is alive
    session.close()


def _asleep(pid: int) -> bool:
    """Whether ``pid`` sleeps in the kernel (state S): a contender queued on a semaphore."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[0] == b"S"


def _lock_user_that_exits(namespace: str, conversation_id: str) -> None:
    session = ShmStore(namespace).get(conversation_id)
    with session.segment.lock:
        pass
    session.close()


def _slow_recording_holder(namespace: str, conversation_id: str, results, commands) -> None:
    """Take the semaphore, then record itself 20 ms later: what ``RobustLock.acquire``
    does when its thread waits for the GIL between ``sem_wait`` returning and the record."""
    session = ShmStore(namespace).get(conversation_id)
    session.segment.semaphore.acquire()
    results.put("semaphore taken")
    time.sleep(0.02)  # the gap itself, not a synchronisation
    session.segment.lock.record()
    results.put("recorded")
    assert take(commands, 1, timeout=20) == ["let go"]
    session.segment.lock.release()
    session.close()


@pytest.mark.timeout(30)
def test_an_exited_holder_leaves_no_record_and_an_unrecorded_hold_is_not_stolen(namespace):
    # Regression: the owner field kept the last holder's pid after it released, and gc's
    # release_if_dead_owner freed the lock at once when that holder had exited while a
    # live new holder had not stored its pid yet: two holders for good (semaphore at 2).
    store = ShmStore(namespace, capacity=4096)
    session = store.create_or_replace("gap")
    commands, results = CTX.Queue(), CTX.Queue()
    with processes() as start:
        user = start(_lock_user_that_exits, namespace, "gap")
        user.join(10)
        assert user.exitcode == 0
        lock = session.segment.lock
        assert lock.owner_pid == 0, "an exited holder's pid stayed in the record"
        assert lock.holder()[2] != 0, "the exited holder never recorded itself"
        holder = start(_slow_recording_holder, namespace, "gap", results, commands)
        assert take(results, 1, timeout=10) == ["semaphore taken"]
        # gc's and the supervisor's probe: it never takes the semaphore, nor steals it.
        assert lock.release_if_dead_owner() is False
        waiter_got_it = threading.Event()

        def waiter():
            lock.acquire(timeout=20)
            waiter_got_it.set()
            lock.release()

        thread = threading.Thread(target=waiter)
        thread.start()
        assert take(results, 1, timeout=10) == ["recorded"]
        assert lock.owner_pid == holder.pid
        assert not waiter_got_it.wait(0.2 + sync.UNRECORDED_HOLD_GRACE), \
            "a waiter took over a live holder's lock"
        commands.put("let go")
        assert waiter_got_it.wait(20)
        thread.join(10)
        holder.join(10)
        assert holder.exitcode == 0
    assert session.segment.semaphore.value == 1  # not 2: there never were two holders
    report = store.gc()
    assert (report.locks_recovered, report.corrupt_removed, report.kept) == (0, 0, 1)
    session.close()


# --- (d) a producer SIGKILLed mid-stream ----------------------------------------------------


def _chunk(index: int) -> bytes:
    return f"data: {{\"n\": {index}}}\n\n".encode()


def _endless_producer(namespace: str, results) -> None:
    session = ShmStore(namespace, capacity=1024 * 1024).create_or_replace("doomed")
    results.put("created")
    index = 0
    while True:
        session.append(_chunk(index))
        index += 1
        time.sleep(0.0005)


def _patient_reader(namespace: str, results) -> None:
    session = ShmStore(namespace, capacity=1024 * 1024).get("doomed")
    received = bytearray()
    for chunk in session.read(0, wake_interval=30.0):  # only a wake-up can end it early
        if not received:
            results.put("reading")
        received += chunk
    results.put((bytes(received), session.info().state))
    session.close()


@pytest.mark.timeout(60)
def test_a_reader_of_a_killed_producer_ends_when_gc_aborts_the_session(namespace):
    store = ShmStore(namespace, capacity=1024 * 1024)
    results = CTX.Queue()
    with processes() as start:
        producer = start(_endless_producer, namespace, results)
        assert take(results, 1, timeout=10) == ["created"]
        reader = start(_patient_reader, namespace, results)
        # The kill lands while the reader reads (a spawned reader can take seconds to
        # start on a loaded machine).
        assert take(results, 1, timeout=30) == ["reading"]
        session = store.get("doomed")
        assert wait_until(lambda: session.info().total_bytes > 20_000)
        os.kill(producer.pid, signal.SIGKILL)
        producer.join(5)
        assert session.info().producer_alive is False
        assert wait_until(lambda: session.info().waiters >= 1), \
            f"the reader never slept (alive: {reader.is_alive()}, exit {reader.exitcode})"
        assert reader.is_alive(), "the reader ended before anyone noticed the dead producer"
        report = store.gc()
        assert report.aborted == 1
        received, reader_state = take(results, 1, timeout=5)[0]
        reader.join(5)
    info = session.info()
    assert info.state is State.ABORTED and reader_state is State.ABORTED
    assert len(received) == info.total_bytes
    expected = bytearray()
    index = 0
    while len(expected) < len(received):
        expected += _chunk(index)
        index += 1
    # The kill may land in the middle of an append; whatever was published is whole.
    assert received == bytes(expected[: len(received)])
    session.close()


# --- (e) no lost wake-up --------------------------------------------------------------------

PING_ROUNDS = 20_000
STALL = 30.0  # the readers' wake interval: any lost wake-up costs this much


def _pinger(namespace: str, results) -> None:
    store = ShmStore(namespace, capacity=64 * 1024)
    ping, pong = store.get("ping"), store.get("pong")
    replies = pong.read(0, wake_interval=STALL)
    worst = 0.0
    started = time.monotonic()
    for index in range(PING_ROUNDS):
        message = index.to_bytes(8, "little")
        sent = time.monotonic()
        ping.append(message)
        reply = next(replies)
        worst = max(worst, time.monotonic() - sent)
        if reply != message:
            results.put(("pinger", index, time.monotonic() - started, worst))
            return
    results.put(("pinger", PING_ROUNDS, time.monotonic() - started, worst))
    ping.finalize()
    ping.close()
    pong.close()


def _ponger(namespace: str, results) -> None:
    store = ShmStore(namespace, capacity=64 * 1024)
    ping, pong = store.get("ping"), store.get("pong")
    count = 0
    for message in ping.read(0, wake_interval=STALL):
        pong.append(message)
        count += 1
    pong.finalize()
    results.put(("ponger", count))
    ping.close()
    pong.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ping_pong_across_processes_loses_no_wake_up(namespace):
    store = ShmStore(namespace, capacity=64 * 1024)
    sessions = [store.create_or_replace("ping"), store.create_or_replace("pong")]
    results = CTX.Queue()
    with processes() as start:
        start(_ponger, namespace, results)
        start(_pinger, namespace, results)
        got = dict((r[0], r[1:]) for r in take(results, 2, timeout=STALL * 4))
    rounds, elapsed, worst = got["pinger"]
    assert rounds == PING_ROUNDS
    assert got["ponger"] == (PING_ROUNDS,)
    assert worst < STALL / 3, f"a round trip took {worst:.1f} s: a wake-up was lost"
    assert elapsed < STALL / 2, f"{PING_ROUNDS} round trips took {elapsed:.1f} s"
    for session in sessions:
        session.close()


def test_the_producer_rings_only_when_someone_waits(shm_store, monkeypatch):
    rings = []
    original = Doorbell.ring

    def counting_ring(self):
        rings.append(time.monotonic())
        original(self)

    monkeypatch.setattr(Doorbell, "ring", counting_ring)
    session = shm_store.create_or_replace("quiet")
    for _ in range(2000):
        session.append(b"x" * 200)
    assert rings == [], "the futex was rung with nobody waiting"

    received = []
    reader_session = shm_store.get("quiet")

    def read_all():
        for chunk in reader_session.read(session.info().total_bytes, wake_interval=STALL):
            received.append(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    assert wait_until(lambda: session.info().waiters == 1)
    session.append(b"wake up")
    assert wait_until(lambda: received == [b"wake up"], timeout=5)
    assert len(rings) >= 1  # the positive control: the patch does see rings
    session.finalize()
    reader.join(5)
    assert not reader.is_alive()
    reader_session.close()
    session.close()


# --- (f) /dev/shm full ----------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.ENOMEM])
def test_no_room_in_dev_shm_is_store_unavailable_and_leaves_nothing(shm_store, namespace,
                                                                    monkeypatch, code):
    keep = shm_store.create_or_replace("before")
    entries = namespace_entries(namespace)

    def full(fd, size):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(segment, "reserve_pages", full)
    with pytest.raises(StoreUnavailable):
        shm_store.create_or_replace("doomed")
    assert namespace_entries(namespace) == entries
    assert shm_store.get("doomed") is None
    monkeypatch.undo()
    after = shm_store.create_or_replace("doomed")
    assert after.append(b"fine") is True
    assert [i.conversation_id for i in shm_store.lookup(["doomed"])] == ["doomed"]
    assert keep.append(b"still fine") is True
    after.close()
    keep.close()


def test_other_reservation_errors_propagate_and_leave_nothing(shm_store, namespace,
                                                              monkeypatch):
    def broken(fd, size):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(segment, "reserve_pages", broken)
    with pytest.raises(OSError) as raised:
        shm_store.create_or_replace("io")
    assert raised.value.errno == errno.EIO
    assert namespace_entries(namespace) == []


TMPFS_SCRIPT = r"""
import json, os, sys
from shmstream.store.errors import StoreUnavailable
from shmstream.shm.store import ShmStore

namespace = sys.argv[1]
store = ShmStore(namespace, capacity=256 * 1024)
sessions, error = [], None
for index in range(64):
    try:
        session = store.create_or_replace(f"s{index}")
    except StoreUnavailable as exc:
        error = str(exc)
        break
    session.append(os.urandom(256 * 1024 + 100))  # grows the ring to its cap, or caps it
    sessions.append(session)
created = len(sessions)
names_after_failure = sorted(os.listdir("/dev/shm"))
sessions.pop(0).close()  # first: a segment still mapped stays allocated (retired)
store.evict("s0")
again = store.create_or_replace("again")
again_ok = again.append(os.urandom(300 * 1024))
print(json.dumps({
    "created": created,
    "error": error,
    "segments_after_failure": sum(1 for n in names_after_failure if n.startswith(namespace + ".")
                                  and not n.endswith((".lock", ".recover", ".index"))),
    "semaphores_after_failure": sum(1 for n in names_after_failure
                                    if n.startswith("sem." + namespace + ".")),
    "again_ok": again_ok,
    "listed": len(store.list()),
}))
"""


def _unshare_available() -> str | None:
    """None if ``unshare -m`` can mount a tmpfs here, else the reason why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=64k tmpfs /dev/shm"],
        capture_output=True, text=True, timeout=10,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}"
    return None


@pytest.mark.timeout(60)
def test_a_real_small_tmpfs_fills_up_cleanly(namespace):
    reason = _unshare_available()
    if reason:
        pytest.skip(reason)
    # The 1 MiB tmpfs exists only inside the child's mount namespace; the real /dev/shm is
    # untouched (the namespace fixture checks).
    command = [
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        'mount -t tmpfs -o size=1m,mode=1777 tmpfs /dev/shm || exit 77; exec "$0" -c "$1" "$2"',
        sys.executable, TMPFS_SCRIPT, namespace,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=50, cwd=REPO)
    if done.returncode == 77:
        pytest.skip(f"mount failed: {done.stderr.strip()}")
    assert done.returncode == 0, f"child died ({done.returncode}): {done.stderr[-2000:]}"
    result = json.loads(done.stdout)
    # 1 MiB holds three full 256 KiB rings with their headers and semaphores; the next
    # ones get their first 64 KiB step, are capped when growth finds no room, and creation
    # fails once not even a first step fits (tests/test_shm_growth.py checks the details).
    assert result["error"] is not None and "no room" in result["error"]
    assert 3 <= result["created"] <= 1024 * 1024 // (64 * 1024)
    assert result["segments_after_failure"] == result["created"]
    assert result["semaphores_after_failure"] == result["created"]
    assert result["again_ok"] is True
    assert result["listed"] == result["created"]


# --- (g) permissions ------------------------------------------------------------------------


def test_segments_semaphores_and_lock_files_are_private(shm_store, namespace):
    session = shm_store.create_or_replace("private")
    name = segment.segment_name(namespace, "private")
    paths = [
        os.path.join(segment.SHM_DIR, name),
        os.path.join(segment.SHM_DIR, "sem." + name),
        segment.registry_lock_path(namespace),
    ]
    for path in paths:
        mode = os.stat(path).st_mode & 0o777
        assert mode == 0o600, f"{path} has mode {mode:o}"
    assert os.stat(paths[0]).st_uid == os.getuid()
    session.close()


def test_segment_names_hide_the_id_and_group_model_variants(shm_store, namespace):
    sessions = [shm_store.create_or_replace(i) for i in ("secret", "secret::m", "other")]
    names = segment.list_names(namespace)
    assert len(names) == 3
    assert not any("secret" in n or "other" in n for n in names)
    assert len({segment.prefix_of(n) for n in names}) == 2  # "secret" and "secret::m" share
    for session in sessions:
        session.close()


# --- (h) corrupt segments -------------------------------------------------------------------


def _garbage(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.write(bytes((i * 37 + 11) % 256 for i in range(layout.HEADER_SIZE)))


def _lying(path: str, size: int) -> None:
    with open(path, "r+b") as f:  # allocated past the end of the file, magic intact
        f.seek(layout.ALLOCATED_OFFSET)
        f.write((10**9).to_bytes(8, "little"))


def _truncated(path: str, size: int) -> None:
    os.truncate(path, 64)


def _shrunk(path: str, size: int) -> None:
    os.truncate(path, size // 2)  # the ring would run past the end


def _bad_metadata(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.seek(layout.META_OFFSET)
        f.write(b"\xc1" * 8)


def _no_semaphore(path: str, size: int) -> None:
    name = os.path.basename(path)
    os.unlink(os.path.join(segment.SHM_DIR, "sem." + name))


@pytest.mark.parametrize("corrupt", [_garbage, _lying, _truncated, _shrunk, _bad_metadata,
                                     _no_semaphore])
def test_a_corrupt_segment_is_skipped_not_fatal(shm_store, namespace, corrupt):
    victim = shm_store.create_or_replace("victim")
    victim.append(b"bytes")
    sibling = shm_store.create_or_replace("victim::model")
    victim.close()  # unmapped before the damage: a shrunk segment would SIGBUS a mapping
    path = os.path.join(segment.SHM_DIR, segment.segment_name(namespace, "victim"))
    corrupt(path, os.stat(path).st_size)

    assert shm_store.get("victim") is None
    assert [i.conversation_id for i in shm_store.lookup(["victim"])] == ["victim::model"]
    assert [i.conversation_id for i in shm_store.list()] == ["victim::model"]
    shm_store.gc()  # must not raise
    assert shm_store.get("victim::model").info().state is State.RUNNING
    fresh = shm_store.create_or_replace("victim")  # replaces whatever is at the name
    assert fresh.append(b"new") is True
    assert shm_store.get("victim").info().total_bytes == 3
    assert shm_store.evict_and_cancel("victim") is True
    fresh.close()
    sibling.close()


def test_gc_removes_unfinished_segments(shm_store, namespace):
    session = shm_store.create_or_replace("half-made")
    session.close()
    path = os.path.join(segment.SHM_DIR, segment.segment_name(namespace, "half-made"))
    with open(path, "r+b") as f:  # as if the creator died before writing the magic
        f.write(bytes(8))
    assert shm_store.gc().corrupt_removed == 0  # its creator might still be at work
    report = shm_store.gc(now=time.time() + segment.DEBRIS_GRACE + 1)
    assert report.corrupt_removed >= 1
    assert namespace_entries(namespace) == []


# --- (i) the polling doorbell ---------------------------------------------------------------

POLLING_READER = r"""
import hashlib, json, sys
from shmstream.shm import sync
from shmstream.shm.store import ShmStore

session = ShmStore(sys.argv[1]).get(sys.argv[2])
received = bytearray()
for chunk in session.read(0, wake_interval=30.0):
    received += chunk
print(json.dumps({"futex": sync.FUTEX_AVAILABLE, "length": len(received),
                  "digest": hashlib.sha256(received).hexdigest(),
                  "state": session.info().state.label}))
"""


@pytest.mark.timeout(60)
def test_the_polling_doorbell_delivers_everything_without_futex(shm_store):
    session = shm_store.create_or_replace("polled")
    environment = dict(os.environ, SHMSTREAM_NO_FUTEX="1")
    reader = subprocess.Popen(
        [sys.executable, "-c", POLLING_READER, shm_store.namespace, "polled"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=REPO,
    )
    try:
        assert wait_until(lambda: session.info().waiters >= 1, timeout=20), \
            "the polling reader never waited"
        sent = bytearray()
        for index in range(300):
            chunk = f"data: {index}\n\n".encode()
            session.append(chunk)
            sent += chunk
            if index % 10 == 0:
                time.sleep(0.002)  # let the reader go back to sleep now and then
        finalized_at = time.monotonic()
        session.finalize()
        out, err = reader.communicate(timeout=20)
        ended_after = time.monotonic() - finalized_at
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait(10)
    assert reader.returncode == 0, err
    result = json.loads(out)
    assert result["futex"] is False
    assert result["length"] == len(sent)
    assert result["digest"] == hashlib.sha256(sent).hexdigest()
    assert result["state"] == "done"
    assert ended_after < 5.0, "the polling reader missed the final wake-up"
    session.close()


# --- the session quota's count ---------------------------------------------------------------


def test_the_session_quota_counts_by_the_index_and_lists_dev_shm_only_at_its_limit(
        namespace, monkeypatch):
    # Listing /dev/shm on every creation made creating O(sessions) under the exclusive
    # registry lock (6 ms per creation with 5,000 sessions): it is only done at the limit.
    listings = []
    real_list_names = segment.list_names

    def counting_list_names(*args, **kwargs):
        listings.append(args)
        return real_list_names(*args, **kwargs)
    monkeypatch.setattr(segment, "list_names", counting_list_names)
    store = ShmStore(namespace, max_sessions=3)
    sessions = [store.create_or_replace(f"q{k}") for k in range(3)]
    assert listings == [] and segment.indexed_count(namespace) == 3
    with pytest.raises(StoreUnavailable, match="session quota reached"):
        store.create_or_replace("q3")
    assert len(listings) == 1  # at the limit: listed to be sure
    replaced = store.create_or_replace("q0")  # a replace frees its own place first
    assert segment.indexed_count(namespace) == 3
    assert store.evict("q1")
    assert segment.indexed_count(namespace) == 2
    sessions.append(store.create_or_replace("q4"))
    assert segment.indexed_count(namespace) == 3
    # A count that is off (a creator killed between its segment and its index entry, or
    # one set by hand) is set right: too high, by the listing at the limit ...
    assert store.evict("q2")
    segment.set_indexed_count(namespace, 100)
    sessions.append(store.create_or_replace("q5"))  # 2 sessions really: it fits
    assert segment.indexed_count(namespace) == 3
    # ... too low, by the next gc pass.
    segment.set_indexed_count(namespace, 0)
    store.gc()
    assert segment.indexed_count(namespace) == 3
    for session in [*sessions, replaced]:
        session.close()


def test_a_glance_reads_state_and_producer_without_mapping_or_locking(namespace):
    """segment.glance (the reaper's first look at a new session): one pread gives the
    inode, the state and the producer's identity; an unfinished header gives None."""
    store = ShmStore(namespace, capacity=4096)
    with store.create_or_replace("glanced") as session:
        name, inode = session.segment.name, session.segment.inode
        header = session.segment.header
        producer = (header.producer_pid, header.producer_start, header.producer_scope)
        seen_inode, seen = segment.glance(name)
        assert seen_inode == inode and seen.state is State.RUNNING
        assert seen.producer == producer and producer[0] == os.getpid()
        session.finalize(State.CANCELLED)
        assert segment.glance(name)[1].state is State.CANCELLED
    assert layout.glance(bytes(layout.HEADER_SIZE)) is None  # no magic: not finished
    assert layout.glance(b"short") is None
    assert segment.glance(f"{namespace}.missing") is None
