"""Run a store operation in a forked child that is SIGKILLed at its n-th crash point
(:mod:`shmstream.store.faults`), and check what the dead leave behind.

The invariants every kill must keep (issue 13): no lock held by the dead for long, never
two holders, nothing that blocks a quota or that gc cannot remove, no reader that waits
forever, every surviving session readable and consistent (or gone), and a usable store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from shmstream import OffsetLost, State
from shmstream.shm import segment
from shmstream.shm.layout import CorruptSegment
from shmstream.shm.store import ShmStore
from shmstream.store import faults

# A holder killed anywhere must be replaced within this (the design bound is about
# sync.UNRECORDED_HOLD_GRACE + one check_interval; the rest is slack for a loaded machine).
LOCK_RECOVERY_BOUND = 2.5


def run_child(body: Callable[[Callable[[], None]], None], kill_at: int | None) -> list[str]:
    """Fork; in the child call ``body(arm)``: crash points reached after ``arm()`` are
    counted and the child SIGKILLs itself at number ``kill_at`` (None: never).

    Returns the names of the points the child reached (all of them when it was not
    killed). Raises AssertionError if the child failed, or was to die and did not.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            reached: list[str] = []

            def hook(name: str) -> None:
                reached.append(name)
                os.write(write_end, name.encode() + b"\n")
                if len(reached) - 1 == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            def arm() -> None:
                faults.hook = hook

            body(arm)
            code = 0
        except BaseException:  # reported through the exit code
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if kill_at is None:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child failed"
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"the child was to die at crash point #{kill_at} and did not ({status})"
    return b"".join(chunks).decode().split()


@contextlib.contextmanager
def scratch_namespace():
    """A fresh namespace for one kill, purged and checked empty afterwards."""
    namespace = f"t{os.getpid()}k{uuid.uuid4().hex[:10]}"
    try:
        yield namespace
    finally:
        ShmStore(namespace).purge()
        left = [e for e in os.listdir(segment.SHM_DIR)
                if e.startswith((namespace + ".", "sem." + namespace + "."))]
        assert left == [], f"left behind: {left}"


@dataclass
class Allowed:
    """What a surviving session may hold: a consistent part of one of ``streams``; with
    ``whole``, exactly a whole stream in state done (a session restored at once)."""

    streams: list[bytes]
    whole: bool = False


@dataclass
class Outcome:
    lock_waits: list[float] = field(default_factory=list)


def check_invariants(namespace: str, allowed: dict[str, Allowed], capacity: int,
                     outcome: Outcome) -> None:
    store = ShmStore(namespace, capacity=capacity, ttl=300)
    # 1. Locks: every segment's lock is free, or freed from its dead holder, quickly; and
    #    the semaphore ends at 1 (an extra post would let two holders in).
    for name in segment.list_names(namespace):
        try:
            seg = segment.open_segment(namespace, name)
        except CorruptSegment as exc:
            assert exc.unfinished, f"{name}: {exc}"  # debris: gc's business below
            continue
        if seg is None:
            continue
        try:
            started = time.monotonic()
            seg.lock.acquire(timeout=LOCK_RECOVERY_BOUND)
            outcome.lock_waits.append(time.monotonic() - started)
            seg.lock.release()
            assert seg.semaphore.value == 1, f"{name}: semaphore at {seg.semaphore.value}"
        finally:
            seg.close()
    # 2. Readers: once dead producers are reaped, every session ends; its bytes are a
    #    consistent part of an allowed stream.
    store.abort_producers()
    for info in store.list():
        rule = allowed.get(info.conversation_id)
        assert rule is not None, f"unexpected session {info.conversation_id!r}"
        assert info.state is not State.RUNNING or info.producer_alive, \
            f"{info.conversation_id}: running with a dead producer after reaping"
        session = store.get(info.conversation_id)
        assert session is not None
        try:
            data = _read_what_is_held(session, info)
        finally:
            session.close()
        start = info.dropped_bytes
        candidates = [s for s in rule.streams if s[start:start + len(data)] == data
                      and len(s) >= info.total_bytes]
        assert candidates, (f"{info.conversation_id}: bytes match no allowed stream "
                            f"({info.dropped_bytes}..{info.total_bytes}: {data[:40]!r})")
        if rule.whole:
            assert info.state is State.DONE and info.total_bytes in map(len, rule.streams), \
                f"{info.conversation_id}: opened half-made ({info.state}, {info.total_bytes})"
    # 3. Debris: gc removes whatever the dead left unfinished; nothing else stays.
    store.gc(now=time.time() + segment.DEBRIS_GRACE + 1)
    assert segment.list_orphan_semaphores(namespace) == []
    names = segment.list_names(namespace)
    for name in names:
        assert segment.unfinished_age(name) is None, f"gc left unfinished {name}"
    # 4. Quotas: what is left is exactly what counts.
    quota = ShmStore(namespace, capacity=capacity, max_sessions=len(names) + 1)
    quota.create_or_replace("quota-probe").close()
    assert quota.evict("quota-probe")
    # 5. The store works: create, append, finalize, read back, evict.
    probe = store.create_or_replace("probe")
    assert probe.append(b"probe bytes") and probe.finalize()
    assert b"".join(probe.read(0)) == b"probe bytes"
    probe.close()
    assert store.evict("probe")


def _read_what_is_held(session, info) -> bytes:
    if info.state is State.RUNNING:  # a live producer (this process): what is there now
        stop = [False]

        def once():
            done, stop[0] = stop[0], True
            return done

        chunks = session.read(info.dropped_bytes, should_stop=once)
    else:
        chunks = session.read(info.dropped_bytes)
    try:
        return b"".join(chunks)
    except OffsetLost:
        raise AssertionError(f"{info.conversation_id}: offset {info.dropped_bytes} lost "
                             f"with no producer") from None
