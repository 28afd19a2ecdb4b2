"""Producers, replacers, openers, readers and gc racing on small rings in several processes
for a fixed time, with the allowed outcomes listed (Aeron's way):

- a reader gets exactly the producer's bytes (from where it started, with no gap), or a
  clean OffsetLost when the producer lapped it; it never waits past its session's end;
- an open of a session whose segment existed before and after the call succeeds;
- a producer whose session was replaced (its name unlinked) has observed its cancel;
- afterwards the store is consistent and gc leaves nothing unusable.

``SHMSTREAM_STRESS_SECONDS`` makes the run longer (default 6 s).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import time

import pytest

from shmstream import OffsetLost, State
from shmstream.shm import segment
from shmstream.shm.store import ShmStore

CTX = multiprocessing.get_context("fork")
DURATION = float(os.environ.get("SHMSTREAM_STRESS_SECONDS", "6"))
CAPACITY = 4096
IDS = ["race-a", "race-b", "race-c::model"]
HOT = "race-hot"  # one producer appends to it flat out: a busy ring that wraps all the time
HANG_GRACE = 15.0  # a reader still waiting this long after the run ended waits forever


def _record(token: str, seq: int) -> bytes:
    return f"[{token}:{seq:06d}]".encode()  # 21 bytes, self-describing


def _stream(token: str, length: int) -> bytes:
    """The first ``length`` bytes of generation ``token``'s stream."""
    size = len(_record(token, 0))
    count = -(-length // size)
    return b"".join(_record(token, seq) for seq in range(count))[:length]


def _hot_producer(namespace: str, until: float, results) -> None:
    store = ShmStore(namespace, capacity=CAPACITY, ttl=0.5)
    outcome = {"role": "hot", "generations": 0, "appended": 0, "violations": []}
    while time.monotonic() < until:
        outcome["generations"] += 1
        token = f"{os.getpid():07d}{outcome['generations']:05d}"
        session = store.create_or_replace(HOT, {"gen": token})
        for seq in range(50_000):
            if not session.append(_record(token, seq)):
                outcome["violations"].append(f"{token}: hot session stopped by someone")
                break
            if seq % 1024 == 0 and time.monotonic() > until:
                break
        outcome["appended"] += seq
        session.finalize()
        session.close()
    results.put(outcome)


def _producer(namespace: str, index: int, until: float, results) -> None:
    rng = random.Random(index)
    store = ShmStore(namespace, capacity=CAPACITY, ttl=0.5)
    outcome = {"role": "producer", "generations": 0, "done": 0, "cancelled": 0,
               "replaced_others": 0, "violations": []}
    generation = 0
    while time.monotonic() < until:
        generation += 1
        token = f"{os.getpid():07d}{generation:05d}"
        session = store.create_or_replace(rng.choice(IDS), {"gen": token})
        outcome["generations"] += 1
        outcome["replaced_others"] += bool(session.replaced)
        stopped = False
        for seq in range(rng.randint(1, 400)):
            if session.producer_should_stop or not session.append(_record(token, seq)):
                stopped = True
                break
            if seq % 64 == 63:
                time.sleep(0.0005)  # pacing, so readers keep up now and then
        if stopped:
            outcome["cancelled"] += 1
        elif session.finalize():
            outcome["done"] += 1
        else:
            outcome["cancelled"] += 1  # cancelled between its last append and finalize
        # Replaced or expired (its name unlinked): then it must have been told to stop.
        if not session.segment.still_named() and not session.producer_should_stop:
            outcome["violations"].append(f"{token}: unlinked but never cancelled")
        session.close()
    results.put(outcome)


def _opener(namespace: str, until: float, results) -> None:
    store = ShmStore(namespace, capacity=CAPACITY)
    outcome = {"role": "opener", "opens": 0, "failed": [], "found": 0}
    paths = {cid: os.path.join(segment.SHM_DIR, segment.segment_name(namespace, cid))
             for cid in IDS}
    paths[HOT] = os.path.join(segment.SHM_DIR, segment.segment_name(namespace, HOT))
    while time.monotonic() < until:
        for cid in [*IDS, HOT, HOT, HOT]:
            before = _inode(paths[cid])
            session = store.get(cid)
            after = _inode(paths[cid])
            outcome["opens"] += 1
            if session is not None:
                outcome["found"] += 1
                session.close()
            elif before is not None and before == after:
                outcome["failed"].append(cid)  # the same segment lived throughout
        for info in store.lookup(["race-a", "race-c"]):
            assert info.conversation_id in IDS
    results.put(outcome)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _reader(namespace: str, index: int, until: float, results) -> None:
    rng = random.Random(1000 + index)
    store = ShmStore(namespace, capacity=CAPACITY)
    outcome = {"role": "reader", "reads": 0, "bytes": 0, "lost": 0, "complete": 0,
               "mismatches": [], "hung": 0}
    hang_at = until + HANG_GRACE
    while time.monotonic() < until:
        session = store.get(rng.choice([*IDS, HOT]))
        if session is None:
            continue
        try:
            info = session.info()
            token = info.metadata["gen"]
            start = 0 if rng.random() < 0.3 else info.dropped_bytes
            data = bytearray()
            hung = [False]

            def should_stop(hung=hung) -> bool:
                hung[0] = time.monotonic() > hang_at
                return hung[0]

            try:
                for chunk in session.read(start, should_stop=should_stop, wake_interval=0.05):
                    data += chunk
            except OffsetLost:
                outcome["lost"] += 1
                continue
            outcome["reads"] += 1
            outcome["bytes"] += len(data)
            if hung[0]:
                outcome["hung"] += 1
                continue
            expected = _stream(token, start + len(data))[start:]
            if bytes(data) != expected:
                outcome["mismatches"].append(f"{token} from {start}: {bytes(data[:40])!r}")
            final = session.info()
            if final.state is State.DONE and start + len(data) == final.total_bytes:
                outcome["complete"] += 1
            elif final.state is State.DONE:
                outcome["mismatches"].append(f"{token}: ended at {start + len(data)} of "
                                             f"{final.total_bytes}")
        finally:
            session.close()
    results.put(outcome)


def _collector(namespace: str, until: float, results) -> None:
    store = ShmStore(namespace, capacity=CAPACITY, ttl=0.5)
    outcome = {"role": "gc", "passes": 0, "expired": 0, "corrupt_removed": 0}
    while time.monotonic() < until:
        report = store.gc()
        store.abort_producers()
        outcome["passes"] += 1
        outcome["expired"] += report.expired
        outcome["corrupt_removed"] += report.corrupt_removed
        time.sleep(0.01)  # a tight supervisor
    results.put(outcome)


@pytest.mark.slow
@pytest.mark.timeout(DURATION + 120)
def test_racing_processes_see_only_allowed_outcomes(namespace):
    results = CTX.Queue()
    until = time.monotonic() + DURATION
    roles = ([(_producer, (namespace, i, until, results)) for i in range(2)]
             + [(_hot_producer, (namespace, until, results))]
             + [(_opener, (namespace, until, results))]
             + [(_reader, (namespace, i, until, results)) for i in range(2)]
             + [(_collector, (namespace, until, results))])
    processes = [CTX.Process(target=target, args=args, daemon=True) for target, args in roles]
    for process in processes:
        process.start()
    outcomes = []
    started = time.monotonic()
    try:
        deadline = until + HANG_GRACE + 30
        while len(outcomes) < len(processes):
            try:
                outcomes.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"only {len(outcomes)} of {len(processes)} processes reported")
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
    print(f"all reported {time.monotonic() - started:.1f} s after the start")
    assert [p.exitcode for p in processes] == [0] * len(processes)
    by_role: dict[str, list[dict]] = {}
    for outcome in outcomes:
        by_role.setdefault(outcome["role"], []).append(outcome)

    print({role: items for role, items in sorted(by_role.items())})  # shown with -s
    producers, readers = by_role["producer"], by_role["reader"]
    assert [v for p in producers + by_role["hot"] for v in p["violations"]] == []
    assert sum(p["replaced_others"] for p in producers) > 0, "no replacement raced"
    assert sum(p["done"] for p in producers) > 0
    assert [m for r in readers for m in r["mismatches"]] == []
    assert sum(r["hung"] for r in readers) == 0, "a reader waited past its session's end"
    assert sum(r["bytes"] for r in readers) > 0 and sum(r["complete"] for r in readers) > 0
    opener = by_role["opener"][0]
    assert opener["found"] > 0
    assert opener["failed"] == [], (f"{len(opener['failed'])} of {opener['opens']} opens of a "
                                    "live segment failed")
    assert by_role["gc"][0]["corrupt_removed"] == 0, "gc found debris nobody should leave"

    # The store is consistent afterwards: every name opens, gc leaves nothing unusable.
    store = ShmStore(namespace, capacity=CAPACITY, ttl=0)
    for info in store.list():
        assert info.state is not State.RUNNING, f"{info.conversation_id} left running"
    store.gc()
    assert segment.list_names(namespace) == []
    assert segment.list_orphan_semaphores(namespace) == []
