"""shm/waiter.py on real segments: one futex waiter per session per process wakes every
local coroutine reader; finished sessions end their waiter at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import uvloop
from polling import wait_until

from shmstream.shm import layout, segment, waiter
from shmstream.store.states import State


def test_a_hundred_local_readers_share_one_counted_futex_waiter(shm_store):
    producer = shm_store.create_or_replace("fan")
    readers = [shm_store.get("fan") for _ in range(100)]
    waiting = threading.Event()

    async def read(session, out):
        async for chunk in session.aread(0):
            out.append(chunk)

    async def main():
        outs = [[] for _ in readers]
        tasks = [asyncio.create_task(read(s, o)) for s, o in zip(readers, outs, strict=True)]
        while producer.info().waiters != 1:
            await asyncio.sleep(0.01)
        waiting.set()
        assert waiter.hub().waiter_count() == 1  # one thread for the session, not 100
        for index in range(10):
            producer.append(b"%d;" % index)
            await asyncio.sleep(0.002)
        producer.finalize(State.DONE)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return outs

    outs = asyncio.run(main())
    assert waiting.is_set()
    expected = b"".join(b"%d;" % i for i in range(10))
    assert all(b"".join(out) == expected for out in outs)
    assert wait_until(lambda: waiter.hub().waiter_count() == 0, 5)  # finished: unmapped
    for session in (producer, *readers):
        session.close()


def test_a_session_that_finishes_while_a_reader_registers_wakes_it(shm_store):
    """The ticket a reader brings may already be stale for a session that just finished:
    its waiter must wake it and go (it once restarted itself forever)."""
    producer = shm_store.create_or_replace("race")
    producer.finalize(State.DONE)
    segment = producer.segment
    ticket = segment.header.i[layout.FUTEX_I]  # as if taken just before the finalize

    async def wait_once():
        started = time.monotonic()
        await waiter.hub().wait(segment, ticket, timeout=10)
        return time.monotonic() - started

    assert asyncio.run(wait_once()) < 5
    assert wait_until(lambda: waiter.hub().waiter_count() == 0, 5)
    producer.close()


def wait_then_leave(producer, reader) -> None:
    """``reader`` waits on its (empty, running) session until this process's waiter is
    counted in the header, then its task is cancelled, as a client that leaves."""
    async def main():
        task = asyncio.create_task(anext(reader.aread(0)))
        while producer.info().waiters != 1:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_cancelled_reader_leaves_no_waiter_behind(shm_store):
    producer = shm_store.create_or_replace("cancel")
    reader = shm_store.get("cancel")

    wait_then_leave(producer, reader)
    # the waiter lingers briefly for readers that come back, then unmaps and uncounts
    assert wait_until(lambda: waiter.hub().waiter_count() == 0, 5)
    assert producer.info().waiters == 0
    producer.finalize(State.DONE)
    for session in (producer, reader):
        session.close()


def test_a_session_ending_while_its_waiter_lingers_is_unmapped_at_once(shm_store,
                                                                        monkeypatch):
    """A reader left a running session (its waiter lingers for readers coming back), then
    the session ends: the waiter must let go of the mapping at once, not when its linger
    runs out, else a DELETE right after the answer retires the segment (its pages still
    held) and the next completion on a full store is 503."""
    monkeypatch.setattr(waiter, "LINGER", 120.0)  # far beyond the bounded wait below
    producer = shm_store.create_or_replace("linger")
    reader = shm_store.get("linger")
    path = os.path.join(segment.SHM_DIR, producer.segment.name)

    wait_then_leave(producer, reader)
    reader.close()
    producer.append(b"more")  # wakes the waiter: nobody waits now, it lingers
    # ... on the doorbell, counted again (one that lingered on a local condition, deaf to
    # the finalize below, kept the mapping for all of LINGER)
    assert wait_until(lambda: producer.info().waiters == 1, 10)
    assert waiter.hub().waiter_count() == 1
    producer.finalize(State.DONE)
    producer.close()
    assert wait_until(lambda: waiter.hub().waiter_count() == 0, 10)
    assert wait_until(lambda: segment._unmapped_everywhere(path), 10)
    assert not shm_store.evict("linger") or segment.list_retired(shm_store.namespace) == []


def test_a_streaming_session_keeps_one_waiter_thread_past_the_linger(shm_store):
    """Readers woken by a publish come back after sending their bytes: the waiter must not
    count that moment as idle (it once quit and was restarted every LINGER seconds while a
    session streamed, a thread start per session twice a second)."""
    producer = shm_store.create_or_replace("steady")
    reader = shm_store.get("steady")
    appends = int(3 * waiter.LINGER / 0.1)  # an append every 100 ms for 3 lingers

    async def read(out):
        async for chunk in reader.aread(0):
            out.append(chunk)
            # A busy worker: the reader comes back to wait well after the waiter thread
            # woke it and looked for waiting readers.
            await asyncio.sleep(0.05)

    async def main():
        out, seen = [], []
        task = asyncio.create_task(read(out))
        while producer.info().waiters != 1:
            await asyncio.sleep(0.01)
        for index in range(appends):
            producer.append(b"%d;" % index)
            await asyncio.sleep(0.1)  # the stream's pace, not a synchronisation
            current = waiter.hub().waiter_for(producer.segment)
            if current is not None and all(current is not w for w in seen):
                seen.append(current)
        producer.finalize(State.DONE)
        await asyncio.wait_for(task, 10)
        return out, seen

    out, seen = uvloop.run(main())  # as in the workers: its wake-up keeps the GIL
    assert b"".join(out) == b"".join(b"%d;" % i for i in range(appends))
    assert len(seen) == 1, f"{len(seen)} waiter threads for one steadily streaming session"
    for session in (producer, reader):
        session.close()
