"""The supervisor as a real process: reaping dead producers, TTL expiry, restart, signals."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from polling import wait_until

from shmstream.config import Settings
from shmstream.serve.supervisor import Supervisor, SupervisorProcess
from shmstream.shm.store import ShmStore
from shmstream.shm.sync import process_alive
from shmstream.store.states import State


def _produce_then_hang(namespace: str, conversation_id: str, ready) -> None:
    session = ShmStore(namespace, capacity=4096).create_or_replace(conversation_id)
    session.append(b"data: partial\n\n")
    ready.set()
    time.sleep(60)


def _start_dead_producer(namespace: str, conversation_id: str) -> None:
    """A process creates a session, appends, and is SIGKILLed (then reaped: no zombie)."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_produce_then_hang, args=(namespace, conversation_id, ready))
    child.start()
    assert ready.wait(10)
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)


def _supervise(namespace: str, **env) -> subprocess.Popen:
    environment = {**os.environ, "SHMSTREAM_NAMESPACE": namespace,
                   **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, "-m", "shmstream.cli.main", "supervise"],
                            env=environment, stderr=subprocess.PIPE, text=True)


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail("supervisor ignored SIGTERM")
    return err


def test_supervisor_process_reaps_dead_producer_and_wakes_reader(namespace):
    store = ShmStore(namespace, capacity=4096)
    marker = store.create_or_replace("marker")
    marker.finalize()
    marker.close()
    supervisor = _supervise(namespace, SHMSTREAM_TTL=0)
    try:
        # Up and running: its first pass (at start) expired the marker.
        assert wait_until(lambda: store.get("marker") is None, timeout=30)
        _start_dead_producer(namespace, "chat::m")
        reader = store.get("chat::m")
        received = []
        finished = threading.Event()

        def follow():
            received.extend(reader.read(0))
            finished.set()

        threading.Thread(target=follow, daemon=True).start()
        # Reaped within a pass or two (0.5 s each); the bound leaves room for a loaded box.
        assert finished.wait(15), "reader still blocked on a dead producer's session"
        assert b"".join(received) == b"data: partial\n\n"
        assert reader.info().state is State.ABORTED
        reader.close()
    finally:
        err = _stop(supervisor)
    assert supervisor.returncode == 0, err
    assert "producer pid" in err  # the reap is logged


def test_supervisor_expires_finished_sessions_after_ttl(namespace):
    store = ShmStore(namespace, capacity=4096)
    session = store.create_or_replace("old")
    session.append(b"x")
    session.finalize()
    session.close()
    store.create_or_replace("running").close()
    supervisor = _supervise(namespace, SHMSTREAM_TTL=0.3, SHMSTREAM_GC_INTERVAL=0.2)
    try:
        assert wait_until(lambda: store.get("old") is None, timeout=30)
        running = store.get("running")
        assert running is not None and running.info().state is State.RUNNING
        running.close()
    finally:
        _stop(supervisor)


def test_supervisor_loop_handles_signals_in_main_loop(namespace):
    supervisor = Supervisor(ShmStore(namespace), gc_interval=60, reap_interval=0.05)
    supervisor.init_signals()
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        started = time.monotonic()
        supervisor.run()
        assert time.monotonic() - started < 10
        assert not supervisor.alive
    finally:
        for sig in Supervisor.SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT
                          else signal.default_int_handler)


def test_supervisor_process_handle_restarts_a_killed_supervisor(namespace):
    handle = SupervisorProcess(Settings(namespace=namespace))
    handle.start()
    try:
        first = handle.process.pid
        assert process_alive(first)
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: handle.process.pid != first and handle.alive(), timeout=30)
        assert handle.restarts == 1
    finally:
        handle.stop()
    assert not handle.alive()


class _FlakyStore:
    """A store double whose passes fail with ``error`` until ``error`` is set to None."""

    def __init__(self, error: Exception | None):
        self.error = error

    def abort_producers(self, pids=None, repeated=False) -> int:
        if self.error is not None:
            raise self.error
        return 0

    def gc(self):
        raise AssertionError("not reached: gc_interval is an hour and next_gc is set")


def _outage_lines(error: Exception, caplog) -> list[str]:
    store = _FlakyStore(error)
    supervisor = Supervisor(store, gc_interval=3600)
    supervisor.next_gc = float("inf")
    with caplog.at_level("INFO", logger="shmstream.serve.supervisor"):
        for _ in range(5):
            supervisor.run_once()
        store.error = None
        for _ in range(3):
            supervisor.run_once()
    assert supervisor.failing is None  # recovered by itself
    return [r.getMessage() for r in caplog.records if r.name == "shmstream.serve.supervisor"]


def test_supervisor_logs_an_outage_the_store_did_not_log_once_each_way(caplog):
    from shmstream.store.errors import StoreUnavailable

    lines = _outage_lines(StoreUnavailable("cannot open /dev/shm/x (EACCES)"), caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("store unavailable: cannot open") and "again" in lines[1]
    assert not any(r.exc_info for r in caplog.records)  # a known outage: no traceback


def test_supervisor_stays_quiet_on_an_outage_the_store_logged_itself(caplog):
    from shmstream.store.errors import StoreUnavailable

    error = StoreUnavailable("session store unavailable: Redis at 127.0.0.1:1: refused")
    error.logged = True  # what the Redis backend's Health raises (it logged the change)
    assert _outage_lines(error, caplog) == []


def test_the_repeated_reaper_reopens_a_running_session_only_once_its_producer_dies(
        namespace, monkeypatch):
    """A pass judges a running session by its producer's liveness alone (one check per
    producer process): it learns the producer from one read of the header, without
    mapping the session or taking its lock; once that producer dies, the next pass opens
    the session and aborts it."""
    from shmstream.shm import upkeep

    store = ShmStore(namespace, capacity=4096)
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    producer = context.Process(target=_produce_then_hang, args=(namespace, "busy", ready))
    producer.start()
    try:
        assert ready.wait(10)
        opened = []
        real_open_any = upkeep.open_any
        monkeypatch.setattr(upkeep, "open_any",
                            lambda store, name: opened.append(name) or real_open_any(store,
                                                                                    name))
        reaper = upkeep.Reaper(store)
        assert reaper.run() == 0 and opened == []  # learns the producer by a glance
        assert reaper.run() == 0 and opened == []  # alive: not opened
        assert reaper._producers  # it does know the session runs
        with store.get("busy") as session:
            assert session.info().state is State.RUNNING
    finally:
        os.kill(producer.pid, signal.SIGKILL)
        producer.join(5)
    assert reaper.run() == 1 and len(opened) == 1
    with store.get("busy") as session:
        assert session.info().state is State.ABORTED
    assert reaper.run() == 0 and len(opened) == 1  # ended: never opened again


def test_the_repeated_reaper_lists_nothing_while_dev_shm_is_unchanged(namespace,
                                                                      monkeypatch):
    """While /dev/shm's mtime stays as it was, and was already older than the racy window
    when it was read, a pass lists nothing: it checks the known producers alone, and a
    known producer's death still makes a full pass that aborts its session. A changed
    mtime lists again and finds a new session; a fresh mtime is never trusted. (The mtime
    is a stand-in here: parallel runs change the real /dev/shm at any time.)"""
    from shmstream.shm import segment, upkeep

    store = ShmStore(namespace, capacity=4096)
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    producer = context.Process(target=_produce_then_hang, args=(namespace, "busy", ready))
    producer.start()
    listings = []
    real_listing = segment.list_name_inodes
    monkeypatch.setattr(segment, "list_name_inodes",
                        lambda ns, prefix=None: listings.append(ns) or real_listing(ns, prefix))
    mtime = [time.time_ns() - 5 * upkeep.Reaper.RACY_NS]
    monkeypatch.setattr(segment, "directory_mtime_ns", lambda: mtime[0])
    reaper = upkeep.Reaper(store)
    try:
        assert ready.wait(10)
        assert reaper.run() == 0 and len(listings) == 1
        assert reaper.run() == 0 and len(listings) == 1  # unchanged: no listing
    finally:
        os.kill(producer.pid, signal.SIGKILL)
        producer.join(5)
    assert reaper.run() == 1 and len(listings) == 2  # its producer died: a full pass
    with store.get("busy") as session:
        assert session.info().state is State.ABORTED
    _start_dead_producer(namespace, "new")
    mtime[0] += 1  # what creating "new" did to the real mtime
    assert reaper.run() == 1 and len(listings) == 3
    with store.get("new") as session:
        assert session.info().state is State.ABORTED
    mtime[0] = time.time_ns()  # within the racy window of the next listing: not trusted
    assert reaper.run() == 0 and reaper.run() == 0 and len(listings) == 5


def test_the_repeated_reaper_skips_ended_sessions_and_catches_a_replacement(namespace):
    """abort_producers(repeated=True), the supervisor's pass: an ended session is never
    opened again, a replacement under the same name (a new segment) is examined afresh,
    and no segment stays mapped between passes (a DELETE or replace of a mapped segment
    retires it: its pages would stay taken until gc)."""
    from shmstream.shm import upkeep

    store = ShmStore(namespace, capacity=4096)
    live = store.create_or_replace("live")  # produced by this process: alive
    ended = store.create_or_replace("ended")
    ended.finalize()
    names = {live.segment.name: "live", ended.segment.name: "ended"}
    live.close()
    ended.close()

    def mapped_here() -> set[str]:
        with open("/proc/self/maps") as maps:
            text = maps.read()
        return {conversation_id for name, conversation_id in names.items() if name in text}

    reaper = upkeep.Reaper(store)
    assert reaper.run() == 0
    assert {names[n] for n, _ in reaper._ended} == {"ended"}
    assert mapped_here() == set()
    # Replaced by a session whose producer died: a new inode under the same name.
    _start_dead_producer(namespace, "ended")
    assert reaper.run() == 1
    with store.get("ended") as again:
        assert again.info().state is State.ABORTED
    assert reaper.run() == 0 and mapped_here() == set()
