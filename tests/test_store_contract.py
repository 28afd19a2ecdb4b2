"""Backend-agnostic store behaviour, through the public interface only.

Every test runs once per backend in ``conftest.BACKENDS``; nothing here may reach into a
backend's internals, so the Redis backend runs the very same tests.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time

import pytest
from polling import wait_until as _wait_until

from shmstream import InvalidConversationId, OffsetLost, State

JOIN_TIMEOUT = 10.0


def drain(session, offset: int = 0, **options) -> bytes:
    """All bytes from ``offset`` of a session that is (or will be) finished."""
    return b"".join(session.read(offset, **options))


class ReaderThread(threading.Thread):
    """Reads a session in the background, recording what arrived and when."""

    def __init__(self, store, conversation_id: str, offset: int = 0, wake_interval=30.0,
                 should_stop=None):
        super().__init__(daemon=True)
        self.session = store.get(conversation_id)
        assert self.session is not None
        self.offset = offset
        self.wake_interval = wake_interval
        self.should_stop = should_stop
        self.chunks: list[tuple[float, bytes]] = []
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        # What tests wait on instead of sleeping: the reader is inside its wait for bytes
        # (``waiting``), and how many times it has looked for them (``polls``).
        self.waiting = False
        self.polls = 0
        sleep, poll = self.session._sleep, self.session._poll

        def watched_sleep(timeout):
            self.waiting = True
            try:
                sleep(timeout)
            finally:
                self.waiting = False

        def watched_poll(offset, limit):
            try:
                return poll(offset, limit)
            finally:
                self.polls += 1

        self.session._sleep, self.session._poll = watched_sleep, watched_poll

    def run(self):
        try:
            for chunk in self.session.read(self.offset, should_stop=self.should_stop,
                                           wake_interval=self.wake_interval):
                self.chunks.append((time.monotonic(), chunk))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.session.close()

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def finish(self) -> None:
        self.join(JOIN_TIMEOUT)
        assert not self.is_alive(), "reader did not end"
        if self.error is not None:
            raise self.error


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.005) -> bool:
    return _wait_until(predicate, timeout, interval)


def ids(infos) -> list[str]:
    return sorted(info.conversation_id for info in infos)


# --- creating, appending, reading -----------------------------------------------------------


def test_create_append_read(store):
    before = time.time()
    session = store.create_or_replace("conv-1", {"model": "llama"})
    assert session.conversation_id == "conv-1"
    assert session.append(b"data: one\n\n") is True
    assert session.append(b"") is True
    assert session.append(bytearray(b"data: two\n\n")) is True
    info = session.info()
    assert info.conversation_id == "conv-1"
    assert info.state is State.RUNNING and not info.is_done
    assert info.total_bytes == 22 and info.dropped_bytes == 0
    assert info.completed_at == 0
    assert before - 1 <= info.started_at <= time.time() + 1
    assert info.metadata.get("model") == "llama"
    assert session.finalize() is True
    assert drain(session) == b"data: one\n\ndata: two\n\n"
    assert drain(session, 11) == b"data: two\n\n"
    assert drain(session, 22) == b""
    assert drain(session, 1000) == b""  # beyond the end of a finished session: ends at once
    session.close()


def test_another_store_and_handle_see_the_same_session(store_factory):
    producer_store, reader_store = store_factory(), store_factory()
    session = producer_store.create_or_replace("shared")
    session.append(b"abc")
    other = reader_store.get("shared")
    assert other is not None
    assert other.info().total_bytes == 3
    session.append(b"def")
    session.finalize(State.DONE)
    assert drain(other) == b"abcdef"
    assert other.info().state is State.DONE
    other.close()
    session.close()


def test_read_with_limit_yields_small_chunks(store):
    session = store.create_or_replace("limited")
    session.append(b"x" * 25)
    session.finalize()
    chunks = list(session.read(0, limit=10))
    assert [len(c) for c in chunks] == [10, 10, 5]
    session.close()


def test_lookup_entry_fields(store):
    session = store.create_or_replace("entry")
    session.append(b"12345")
    entry = session.info().lookup_entry()
    assert list(entry)[:5] == ["conversation_id", "is_done", "total_bytes", "started_at",
                               "completed_at"]
    assert entry["conversation_id"] == "entry" and entry["is_done"] is False
    assert entry["total_bytes"] == 5 and entry["completed_at"] == 0
    session.finalize()
    entry = session.info().lookup_entry()
    assert entry["is_done"] is True and entry["completed_at"] >= entry["started_at"] > 0
    session.close()


# --- finishing ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.DONE, State.FAILED, State.ABORTED, State.CANCELLED])
def test_finalize_states_are_kept_first_wins(store, state):
    session = store.create_or_replace(f"fin-{state.label}")
    session.append(b"x")
    assert session.finalize(state) is True
    assert session.finalize(State.DONE if state is not State.DONE else State.FAILED) is False
    info = session.info()
    assert info.state is state and info.is_done
    assert info.completed_at >= info.started_at
    assert session.append(b"more") is False
    assert session.append(b"") is True
    assert session.producer_should_stop is True
    assert drain(session) == b"x"
    session.close()


def test_cancel_stops_the_producer_and_ends_readers(store):
    producer = store.create_or_replace("cancel-me")
    producer.append(b"partial")
    assert producer.producer_should_stop is False
    reader = ReaderThread(store, "cancel-me")
    reader.start()
    assert wait_until(lambda: reader.data == b"partial")
    canceller = store.get("cancel-me")
    assert canceller.cancel() is True
    canceller.close()
    reader.finish()
    assert reader.data == b"partial"
    # Redis tells the producer's handle by pub/sub: soon, not in the same instant (a
    # loaded machine showed the lag); what a producer relies on is noticing it.
    assert wait_until(lambda: producer.producer_should_stop is True)
    assert producer.append(b"late") is False
    assert producer.info().state is State.CANCELLED
    assert producer.cancel() is False  # already finished
    producer.close()


def test_cancel_after_done_keeps_done_but_flags_stop(store):
    session = store.create_or_replace("done-then-cancel")
    session.finalize(State.DONE)
    assert session.cancel() is False
    assert session.info().state is State.DONE
    assert session.producer_should_stop is True
    session.close()


def test_create_or_replace_cancels_the_old_session(store_factory):
    first_store, second_store = store_factory(), store_factory()
    old = first_store.create_or_replace("replace-me")
    old.append(b"old bytes")
    reader = ReaderThread(first_store, "replace-me")
    reader.start()
    assert wait_until(lambda: reader.data == b"old bytes")
    new = second_store.create_or_replace("replace-me")
    reader.finish()  # the old session's reader ends
    assert reader.data == b"old bytes"
    assert old.append(b"more") is False
    assert old.producer_should_stop is True
    assert old.info().state is State.CANCELLED
    assert new.producer_should_stop is False
    assert new.append(b"new") is True
    current = first_store.get("replace-me")
    assert current.info().state is State.RUNNING
    assert current.info().total_bytes == 3
    assert len(first_store.lookup(["replace-me"])) == 1
    for session in (current, new, old):
        session.close()


def test_create_or_replace_after_finish_starts_fresh(store):
    first = store.create_or_replace("again")
    first.append(b"first")
    first.finalize()
    second = store.create_or_replace("again")
    assert second.info().total_bytes == 0
    assert first.info().state is State.DONE  # a finished session keeps its state
    second.close()
    first.close()


# --- finding --------------------------------------------------------------------------------


def test_get_unknown_is_none(store):
    assert store.get("never-created") is None
    assert store.lookup(["never-created"]) == []


def test_list_shows_every_session(store):
    sessions = [store.create_or_replace(name) for name in ("l1", "l2", "l3::m")]
    assert ids(store.list()) == ["l1", "l2", "l3::m"]
    for session in sessions:
        session.close()


def test_lookup_exact_and_model_suffix(store):
    sessions = [store.create_or_replace(name) for name in
                ("chat", "chat::org/model-a", "chat::model-b", "chatX", "chat:x", "other::chat")]
    assert ids(store.lookup(["chat"])) == ["chat", "chat::model-b", "chat::org/model-a"]
    assert ids(store.lookup(["chat::model-b"])) == ["chat::model-b"]
    assert ids(store.lookup(["chatX"])) == ["chatX"]
    assert ids(store.lookup(["cha"])) == []  # a prefix without "::" matches nothing
    assert ids(store.lookup(["chat:"])) == []
    # Each session once, even when several requested ids match it.
    assert ids(store.lookup(["chat::model-b", "chat", "chat"])) == \
        ["chat", "chat::model-b", "chat::org/model-a"]
    assert ids(store.lookup(["chatX", "other"])) == ["chatX", "other::chat"]
    for session in sessions:
        session.close()


def test_lookup_of_an_id_ending_in_a_colon(store):
    # "a:" + "::m" is "a:::m", whose first "::" starts one byte earlier than the suffix.
    sessions = [store.create_or_replace(name) for name in ("a:", "a:::m", "a::m", "a")]
    assert ids(store.lookup(["a:"])) == ["a:", "a:::m"]
    assert ids(store.lookup(["a"])) == ["a", "a:::m", "a::m"]
    for session in sessions:
        session.close()


def test_lookup_reports_state_and_totals(store):
    running = store.create_or_replace("look::a")
    running.append(b"abc")
    done = store.create_or_replace("look::b")
    done.finalize()
    infos = {info.conversation_id: info for info in store.lookup(["look"])}
    assert infos["look::a"].is_done is False and infos["look::a"].total_bytes == 3
    assert infos["look::b"].is_done is True and infos["look::b"].completed_at > 0
    running.close()
    done.close()


def test_lookup_ignores_invalid_and_empty_ids(store):
    session = store.create_or_replace("valid")
    assert ids(store.lookup(["", "\ud800", "x" * 100_000, "valid", ""])) == ["valid"]
    assert store.lookup([]) == []
    assert store.lookup(["", "\udfff"]) == []
    assert ids(store.lookup(iter(["valid"]))) == ["valid"]  # any iterable
    session.close()


# --- removing -------------------------------------------------------------------------------


def test_evict_finalizes_as_done_and_removes(store):
    session = store.create_or_replace("evict-me")
    session.append(b"abc")
    reader = ReaderThread(store, "evict-me")
    reader.start()
    assert wait_until(lambda: reader.data == b"abc")
    assert store.evict("evict-me") is True
    reader.finish()
    assert store.get("evict-me") is None
    assert store.lookup(["evict-me"]) == []
    assert session.info().state is State.DONE
    assert session.append(b"x") is False
    assert store.evict("evict-me") is False
    assert store.evict("never-there") is False
    session.close()


def test_evict_keeps_a_terminal_state(store):
    session = store.create_or_replace("failed-then-evicted")
    session.finalize(State.FAILED)
    assert store.evict("failed-then-evicted") is True
    assert session.info().state is State.FAILED
    session.close()


def test_evict_and_cancel_is_the_users_stop(store):
    session = store.create_or_replace("stop-me::model")
    session.append(b"abc")
    reader = ReaderThread(store, "stop-me::model")
    reader.start()
    assert wait_until(lambda: reader.data == b"abc")
    assert store.evict_and_cancel("stop-me::model") is True
    reader.finish()
    assert session.producer_should_stop is True
    assert session.info().state is State.CANCELLED
    assert session.append(b"x") is False
    assert store.get("stop-me::model") is None
    assert store.evict_and_cancel("stop-me::model") is False
    assert store.evict_and_cancel("unknown") is False
    session.close()


def test_evict_touches_only_the_exact_id(store):
    sessions = [store.create_or_replace(name) for name in ("e", "e::m", "eX")]
    assert store.evict_and_cancel("e") is True
    assert ids(store.list()) == ["e::m", "eX"]
    assert sessions[1].producer_should_stop is False
    for session in sessions:
        session.close()


def test_gc_removes_only_sessions_finished_more_than_ttl_ago(store_factory):
    store = store_factory(ttl=10)
    running = store.create_or_replace("gc-running")
    older = store.create_or_replace("gc-older")
    older.append(b"bye")
    older.finalize()
    older_end = older.info().completed_at
    assert wait_until(lambda: time.time() > older_end + 0.01)  # distinct completion times
    newer = store.create_or_replace("gc-newer")
    newer.finalize()
    newer_end = newer.info().completed_at
    assert newer_end > older_end
    everything = ["gc-newer", "gc-older", "gc-running"]
    store.gc()
    assert ids(store.list()) == everything
    store.gc(time.time() + 5)  # both finished less than the TTL before "now"
    assert ids(store.list()) == everything
    # "now" is just over the TTL after the older one ended, just under it for the newer.
    store.gc((older_end + newer_end) / 2 + 10)
    assert ids(store.list()) == ["gc-newer", "gc-running"]
    assert store.get("gc-older") is None
    assert drain(newer) == b""  # still readable
    store.gc(time.time() + 3600)
    assert ids(store.list()) == ["gc-running"]  # a live producer's session is never collected
    assert running.info().state is State.RUNNING
    assert running.append(b"still here") is True
    for session in (running, older, newer):
        session.close()


# --- capacity -------------------------------------------------------------------------------


def test_capacity_drops_the_oldest_bytes(store_factory):
    store = store_factory(capacity=1024)
    session = store.create_or_replace("small")
    stream = bytes(range(256)) * 12  # 3072 bytes
    for start in range(0, len(stream), 100):
        assert session.append(stream[start : start + 100])
    info = session.info()
    assert info.total_bytes == 3072
    assert info.dropped_bytes == 3072 - 1024
    assert info.capacity == 1024
    session.finalize()
    with pytest.raises(OffsetLost):
        drain(session, 0)
    with pytest.raises(OffsetLost):
        drain(session, info.dropped_bytes - 1)
    assert drain(session, info.dropped_bytes) == stream[-1024:]
    assert drain(session, 3000) == stream[3000:]
    session.close()


def test_read_held_returns_info_with_the_oldest_held_bytes(store_factory):
    store = store_factory(capacity=1024)
    session = store.create_or_replace("held")
    info, held = session.read_held()
    assert (info.total_bytes, info.dropped_bytes, held) == (0, 0, b"")
    stream = bytes(range(256)) * 12  # 3072 bytes: the ring wrapped twice
    for start in range(0, len(stream), 100):
        assert session.append(stream[start : start + 100])
    info, held = session.read_held()
    assert (info.total_bytes, info.dropped_bytes) == (3072, 3072 - 1024)
    assert held == stream[-1024:]
    info, first = session.read_held(limit=10)
    assert first == stream[info.dropped_bytes : info.dropped_bytes + 10]
    assert session.info().waiters == 0  # read_held never arms a wait
    session.finalize()
    session.close()


def test_one_append_larger_than_capacity_keeps_its_tail(store_factory):
    store = store_factory(capacity=1024)
    session = store.create_or_replace("huge-chunk")
    session.append(b"head")
    chunk = os.urandom(5000)
    assert session.append(chunk) is True
    info = session.info()
    assert info.total_bytes == 5004 and info.dropped_bytes == 5004 - 1024
    session.finalize()
    assert drain(session, info.dropped_bytes) == chunk[-1024:]
    session.close()


def test_a_lapped_reader_gets_offset_lost(store_factory):
    store = store_factory(capacity=1024)
    session = store.create_or_replace("lapped")
    reader = store.get("lapped")
    chunks = reader.read(0)
    session.append(b"a" * 100)
    assert next(chunks) == b"a" * 100
    session.append(b"b" * 3000)  # the reader's next byte (offset 100) is gone
    with pytest.raises(OffsetLost):
        next(chunks)
    reader.close()
    session.close()


# --- waiting readers ------------------------------------------------------------------------


def test_a_blocked_reader_wakes_on_append_and_on_finalize(store):
    session = store.create_or_replace("wake")
    reader = ReaderThread(store, "wake", wake_interval=30.0)  # only a real wake-up can help
    reader.start()
    assert wait_until(lambda: reader.waiting)  # blocked, waiting for bytes
    appended_at = time.monotonic()
    session.append(b"hello")
    assert wait_until(lambda: reader.data == b"hello", timeout=10)
    assert reader.chunks[0][0] - appended_at < 5.0  # a wake-up, not the 30 s interval
    assert wait_until(lambda: reader.waiting)  # blocked again
    finalized_at = time.monotonic()
    session.finalize()
    reader.finish()
    assert reader.ended_at - finalized_at < 5.0
    assert reader.data == b"hello"
    session.close()


def test_a_reader_beyond_total_waits_until_the_stream_passes_it(store):
    session = store.create_or_replace("ahead")
    session.append(b"0123")
    reader = ReaderThread(store, "ahead", offset=6, wake_interval=30.0)
    reader.start()
    assert wait_until(lambda: reader.waiting)
    polls = reader.polls
    session.append(b"45")
    # Woken, it looked, found nothing at its offset, and waits again.
    assert wait_until(lambda: reader.polls > polls and reader.waiting, timeout=10)
    assert reader.data == b""
    session.append(b"6789")
    assert wait_until(lambda: reader.data == b"6789")
    session.finalize()
    reader.finish()
    session.close()


def test_should_stop_is_checked_within_the_wake_interval_while_idle(store):
    session = store.create_or_replace("idle")
    calls: list[float] = []
    stop = threading.Event()

    def should_stop() -> bool:
        calls.append(time.monotonic())
        return stop.is_set()

    reader = ReaderThread(store, "idle", wake_interval=0.05, should_stop=should_stop)
    reader.start()
    assert wait_until(lambda: len(calls) >= 6, timeout=20)
    stop.set()
    stopped_at = time.monotonic()
    reader.finish()
    # Bounds far above the 50 ms interval (a loaded machine), far below the 30 s default.
    assert reader.ended_at - stopped_at < 5.0
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert max(gaps) < 5.0, f"should_stop was not called for {max(gaps):.3f} s"
    assert session.info().state is State.RUNNING  # a reader stopping ends nothing else
    session.close()


def test_many_reader_threads_get_every_byte(store_factory):
    store = store_factory(capacity=1024 * 1024)
    session = store.create_or_replace("fanout")
    readers = [ReaderThread(store, "fanout", wake_interval=1.0) for _ in range(4)]
    for reader in readers:
        reader.start()
    expected = bytearray()
    for index in range(2000):
        chunk = f"data: {index}\n\n".encode()
        expected += chunk
        session.append(chunk)
    session.finalize()
    for reader in readers:
        reader.finish()
        assert reader.data == expected
    session.close()


# --- conversation ids -----------------------------------------------------------------------

MARKER = "zzmarkerzz"
WEIRD_IDS = [
    f"../../{MARKER}/etc/passwd",
    f"/{MARKER}",
    f"a/b/{MARKER}::org/model:q4",
    f"nul\x00{MARKER}\x00end",
    f"{MARKER}" + "x" * 10_000,
    f"emoji 🙂🚀 {MARKER} 中文",
    f"{MARKER} with spaces\tand\nnewlines",
    f"{MARKER}::",
    f"::{MARKER}",
    ".",
    "..",
    "%2F%00",
]


def _names_with_marker() -> list[str]:
    found = []
    for directory in ("/dev/shm", tempfile.gettempdir(), os.getcwd()):
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        found += [os.path.join(directory, e) for e in entries if MARKER in e]
    return found


def test_weird_ids_work_and_never_become_paths(store):
    before = _names_with_marker()
    sessions = []
    for index, conversation_id in enumerate(WEIRD_IDS):
        session = store.create_or_replace(conversation_id, {"n": index})
        session.append(conversation_id.encode())
        sessions.append(session)
    for index, conversation_id in enumerate(WEIRD_IDS):
        found = store.get(conversation_id)
        assert found is not None, repr(conversation_id[:40])
        assert found.conversation_id == conversation_id
        info = found.info()
        assert info.conversation_id == conversation_id
        assert info.metadata.get("n") == index
        assert info.total_bytes == len(conversation_id.encode())
        assert conversation_id in ids(store.lookup([conversation_id]))
        found.close()
    assert sorted(ids(store.list())) == sorted(WEIRD_IDS)
    assert _names_with_marker() == before
    assert ids(store.lookup([f"a/b/{MARKER}"])) == [f"a/b/{MARKER}::org/model:q4"]
    for conversation_id in WEIRD_IDS:
        assert store.evict_and_cancel(conversation_id) is True
    assert store.list() == []
    for session in sessions:
        session.close()


def test_near_duplicate_ids_are_distinct(store):
    names = ["a", "a\x00", "a ", "A", "a::", "a::m", "a::M", "é", "e\u0301"]
    sessions = {name: store.create_or_replace(name) for name in names}
    for name, session in sessions.items():
        session.append(name.encode())
    for name in names:
        found = store.get(name)
        assert found.info().total_bytes == len(name.encode())
        assert found.conversation_id == name
        found.close()
    for session in sessions.values():
        session.close()


@pytest.mark.parametrize("bad", ["", "\ud800", "ok\udfffok", "\ud83d"])
def test_empty_and_lone_surrogate_ids_are_invalid(store, bad):
    with pytest.raises(InvalidConversationId):
        store.create_or_replace(bad)
    assert store.list() == []


def test_reopen_reads_the_same_session_after_its_id_was_replaced(store):
    first = store.create_or_replace("again")
    first.append(b"first answer")
    reader = first.reopen()
    second = store.create_or_replace("again")
    second.append(b"second")
    assert b"".join(reader.read(0)) == b"first answer"  # ends: the first was cancelled
    assert reader.info().state is State.CANCELLED
    first.close()  # the other handle keeps working after this one closed
    assert b"".join(reader.read(6)) == b"answer"
    reader.close()
    second.close()


# --- the stored record -----------------------------------------------------------------------


def test_the_stored_id_cannot_be_overridden_by_metadata(store_factory):
    """Both backends store the session's own id in its record, whatever ``metadata`` says:
    lookup, list and get report it, and the caller's other metadata is kept."""
    store = store_factory()
    session = store.create_or_replace("real::m", {"id": "forged", "model": "m"})
    session.append(b"x")
    for info in (session.info(), *store.list(), *store.lookup(["real"])):
        assert info.conversation_id == "real::m"
        assert info.metadata["id"] == "real::m"
        assert info.metadata["model"] == "m"
    assert store.lookup(["forged"]) == []
    assert store.get("forged") is None
    other = store_factory()  # another process's view: read back from the store itself
    reader = other.get("real::m")
    assert reader.info().metadata == {"id": "real::m", "model": "m"}
    for handle in (session, reader):
        handle.close()


# --- asyncio readers ---------------------------------------------------------------------------


def test_asyncio_readers_get_every_byte_and_end(store):
    import asyncio

    producer = store.create_or_replace("async")
    readers = [store.get("async") for _ in range(20)]
    expected = b"".join(f"data: {index}\n\n".encode() for index in range(200))

    async def read(session, offset):
        return b"".join([chunk async for chunk in session.aread(offset)])

    def produce():
        for index in range(200):
            producer.append(f"data: {index}\n\n".encode())
        producer.finalize()

    async def main():
        tasks = [asyncio.create_task(read(session, 0)) for session in readers]
        await asyncio.sleep(0)  # every reader starts (and most wait) before any byte
        thread = threading.Thread(target=produce)
        thread.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), JOIN_TIMEOUT)
        finally:
            thread.join(JOIN_TIMEOUT)

    assert asyncio.run(main()) == [expected] * len(readers)
    late = store.get("async")
    assert asyncio.run(read(late, 11)) == expected[11:]  # after the end: the rest, then ends
    for session in (producer, late, *readers):
        session.close()


def test_a_handles_metadata_is_its_own_sessions_also_after_a_replace(store_factory):
    """``Session.metadata()`` (what a relay ticket checks ownership by) is the record the
    session was created with, read from the store, and a handle on a replaced session
    keeps its own: it never reports the newer session's."""
    store, other = store_factory(), store_factory()
    first = store.create_or_replace("meta", {"relay_token": "one"})
    reader = other.get("meta")
    assert reader.metadata() == reader.info().metadata == {"id": "meta", "relay_token": "one"}
    second = store.create_or_replace("meta", {"relay_token": "two"})
    assert reader.metadata()["relay_token"] == "one"
    newer = other.get("meta")
    assert newer.metadata()["relay_token"] == "two"
    for handle in (first, reader, second, newer):
        handle.close()
