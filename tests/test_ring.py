"""The ring on a plain buffer: unit tests, then a state machine against the seed's semantics.

The reference model is llama.cpp's ``stream_session`` (``seed/server-stream.cpp.txt``) written
out in Python: a bytes buffer with ``prefix_dropped``, erasing from the front when full. The
ring must be indistinguishable from it through ``append``, ``finalize`` and ``read_from``.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shmstream.store import ring
from shmstream.store.errors import OffsetLost
from shmstream.store.ring import Ring, Step

GUARD = 16
GUARD_BYTE = 0xA5


def guarded(capacity: int) -> tuple[bytearray, memoryview]:
    """A ring of ``capacity`` bytes with guard bytes on both sides.

    The ring is a fixed-size memoryview (like the mapped segment), so a slice assignment of
    the wrong length raises instead of silently resizing the way a bytearray would.
    """
    backing = bytearray([GUARD_BYTE]) * (GUARD + capacity + GUARD)
    return backing, memoryview(backing)[GUARD : GUARD + capacity]


def guards_intact(backing: bytearray) -> bool:
    return (backing[:GUARD] == bytes([GUARD_BYTE]) * GUARD
            and backing[-GUARD:] == bytes([GUARD_BYTE]) * GUARD)


def pattern(start: int, length: int) -> bytes:
    """Bytes whose value depends on their stream offset, so misplaced bytes show."""
    return bytes((offset * 7 + 3) % 251 for offset in range(start, start + length))


class RecordingBuffer:
    """A buffer that remembers which index ranges were read and written."""

    def __init__(self, size: int):
        self.data = bytearray(size)
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(len(self.data))
        self.reads.append((start, stop))
        return bytes(self.data[key])

    def __setitem__(self, key: slice, value) -> None:
        start, stop, _ = key.indices(len(self.data))
        assert stop - start == len(value), "slice assignment would resize the ring"
        self.writes.append((start, stop))
        self.data[key] = value

    def __len__(self) -> int:
        return len(self.data)


# --- ring.write / ring.read ---------------------------------------------------------------


def test_write_and_read_without_wrap():
    backing, buffer = guarded(16)
    total = ring.write(buffer, 16, 0, b"hello")
    total = ring.write(buffer, 16, total, b" world")
    assert total == 11
    assert ring.read(buffer, 16, total, 0) == b"hello world"
    assert ring.read(buffer, 16, total, 6) == b"world"
    assert ring.read(buffer, 16, total, 0, limit=4) == b"hell"
    assert guards_intact(backing)


def test_wraparound_keeps_the_last_capacity_bytes():
    capacity = 10
    backing, buffer = guarded(capacity)
    total = 0
    for start in range(0, 37, 3):
        total = ring.write(buffer, capacity, total, pattern(start, 3))
    assert total == 39
    assert ring.dropped_for(total, capacity) == 29
    assert ring.read(buffer, capacity, total, 29) == pattern(29, 10)
    assert ring.read(buffer, capacity, total, 35) == pattern(35, 4)
    # A read that starts before the wrap point and ends after it, with a limit.
    assert ring.read(buffer, capacity, total, 29, limit=7) == pattern(29, 7)
    assert guards_intact(backing)


def test_chunk_of_exactly_capacity_replaces_everything():
    capacity = 8
    backing, buffer = guarded(capacity)
    total = ring.write(buffer, capacity, 0, pattern(0, 5))
    total = ring.write(buffer, capacity, total, pattern(5, capacity))
    assert total == 13
    assert ring.dropped_for(total, capacity) == 5
    assert ring.read(buffer, capacity, total, 5) == pattern(5, capacity)
    with pytest.raises(OffsetLost):
        ring.read(buffer, capacity, total, 4)
    assert guards_intact(backing)


@pytest.mark.parametrize("before", [0, 1, 7, 8, 13])
def test_chunk_larger_than_capacity_keeps_only_its_tail(before):
    capacity = 8
    backing, buffer = guarded(capacity)
    total = ring.write(buffer, capacity, 0, pattern(0, before)) if before else 0
    chunk = pattern(before, 3 * capacity + 5)
    total = ring.write(buffer, capacity, total, chunk)
    assert total == before + len(chunk)
    assert ring.dropped_for(total, capacity) == total - capacity
    assert ring.read(buffer, capacity, total, total - capacity) == chunk[-capacity:]
    assert guards_intact(backing)


def test_read_lost_offset_raises():
    _backing, buffer = guarded(4)
    total = ring.write(buffer, 4, 0, b"abcdefg")
    with pytest.raises(OffsetLost):
        ring.read(buffer, 4, total, 2)
    assert ring.read(buffer, 4, total, 3) == b"defg"


def test_read_at_or_beyond_total_is_empty():
    _backing, buffer = guarded(4)
    total = ring.write(buffer, 4, 0, b"ab")
    assert ring.read(buffer, 4, total, 2) == b""
    assert ring.read(buffer, 4, total, 1000) == b""


def test_read_never_touches_bytes_past_total():
    # On tmpfs, reading a never-written page allocates it: a reader must stay below total.
    buffer = RecordingBuffer(4096)
    total = ring.write(buffer, 4096, 0, b"x" * 100)
    for offset in (0, 50, 99, 100, 5000):
        ring.read(buffer, 4096, total, offset)
        ring.read(buffer, 4096, total, offset, limit=10)
    assert buffer.reads and all(stop <= total for _, stop in buffer.reads)
    assert all(stop <= total for _, stop in buffer.writes)


def test_write_touches_only_the_positions_it_fills():
    buffer = RecordingBuffer(10)
    total = ring.write(buffer, 10, 0, b"abcdef")
    total = ring.write(buffer, 10, total, b"ghijkl")  # wraps: 6..10 then 0..2
    assert buffer.writes == [(0, 6), (6, 10), (0, 2)]
    assert total == 12


@pytest.mark.parametrize("seed", range(20))
def test_a_growing_ring_touches_only_bytes_below_its_allocation(seed):
    """The shared-memory ring grows: before the first wrap, offset o sits at index o, so
    writes stay below ``total`` and a ring grown to a larger allocation never moves a byte;
    lowering the capacity to an allocation >= total (a full /dev/shm) keeps every read."""
    rng = random.Random(seed)
    capacity = rng.randrange(64, 4096)
    buffer = RecordingBuffer(capacity)
    total = 0
    while total < capacity:
        data = rng.randbytes(rng.randrange(1, capacity // 4 + 2))
        if total + len(data) > capacity:
            break
        total = ring.write(buffer, capacity, total, data)
        assert all(stop <= total for _, stop in buffer.writes)  # never past the allocation
    held = ring.read(buffer, capacity, total, 0)
    lowered = rng.randrange(max(total, 1), capacity + 1)
    assert ring.read(buffer, lowered, total, 0) == held  # capped: nothing moved
    reference = Ring(bytearray(capacity), lowered)
    reference.append(held)
    extra = rng.randbytes(rng.randrange(1, 3 * lowered))
    total = ring.write(buffer, lowered, total, extra)
    reference.append(extra)
    assert ring.read(buffer, lowered, total, reference.dropped) == \
        reference.read(reference.dropped)
    assert all(stop <= lowered for _, stop in buffer.writes)  # the capped ring stays inside


# --- next_step ------------------------------------------------------------------------------


def test_next_step_decisions():
    assert ring.next_step(total=10, capacity=4, finished=False, offset=6) is Step.DATA
    assert ring.next_step(total=10, capacity=4, finished=False, offset=10) is Step.WAIT
    assert ring.next_step(total=10, capacity=4, finished=False, offset=99) is Step.WAIT
    assert ring.next_step(total=10, capacity=4, finished=True, offset=9) is Step.DATA
    assert ring.next_step(total=10, capacity=4, finished=True, offset=10) is Step.END
    assert ring.next_step(total=10, capacity=4, finished=True, offset=99) is Step.END
    with pytest.raises(OffsetLost):
        ring.next_step(total=10, capacity=4, finished=True, offset=5)
    assert ring.next_step(total=0, capacity=4, finished=False, offset=0) is Step.WAIT
    assert ring.next_step(total=0, capacity=4, finished=True, offset=0) is Step.END


# --- Ring -----------------------------------------------------------------------------------


def test_ring_append_read_finalize():
    r = Ring(bytearray(8))
    assert r.append(b"abc") is True
    assert r.read(0) == b"abc"
    assert r.next_step(3) is Step.WAIT
    r.finalize()
    assert r.next_step(3) is Step.END
    assert r.next_step(0) is Step.DATA
    assert r.append(b"more") is False
    assert r.total == 3


def test_ring_empty_append_is_true_even_after_finalize():
    r = Ring(bytearray(8))
    assert r.append(b"") is True
    r.finalize()
    assert r.append(b"") is True
    assert r.append(memoryview(b"")) is True
    assert r.total == 0


def test_ring_offset_lost_and_beyond_total():
    r = Ring(bytearray(4))
    r.append(b"0123456789")
    assert r.dropped == 6
    with pytest.raises(OffsetLost):
        r.read(5)
    with pytest.raises(OffsetLost):
        r.next_step(0)
    assert r.read(6) == b"6789"
    assert r.next_step(11) is Step.WAIT
    r.finalize()
    assert r.next_step(11) is Step.END


def test_ring_capacity_smaller_than_buffer_and_invalid_capacity():
    backing = bytearray(b"\xff" * 12)
    r = Ring(backing, capacity=4)
    r.append(b"abcdef")
    assert r.read(2) == b"cdef"
    assert backing[4:] == b"\xff" * 8  # nothing written past the capacity
    with pytest.raises(ValueError):
        Ring(bytearray(0))
    with pytest.raises(ValueError):
        Ring(bytearray(4), capacity=0)


def test_ring_accepts_memoryview_and_bytearray_data():
    r = Ring(bytearray(6))
    r.append(bytearray(b"abcd"))
    r.append(memoryview(b"xxefgh")[2:])
    assert r.read(2) == b"cdefgh"


# --- the seed as a reference model ----------------------------------------------------------


class SeedSession:
    """llama.cpp's ``stream_session`` without threads: a bytes buffer erased from the front."""

    OK, OFFSET_LOST = "ok", "offset_lost"

    def __init__(self, cap_bytes: int):
        self.cap_bytes = cap_bytes
        self.buffer = b""
        self.prefix_dropped = 0
        self.done = False

    def append(self, data: bytes) -> bool:
        if len(data) == 0:
            return True
        if self.done:
            return False
        if len(data) >= self.cap_bytes:
            skip = len(data) - self.cap_bytes
            self.prefix_dropped += len(self.buffer) + skip
            self.buffer = data[skip:]
        else:
            needed = len(self.buffer) + len(data)
            if needed > self.cap_bytes:
                to_drop = needed - self.cap_bytes
                self.buffer = self.buffer[to_drop:]
                self.prefix_dropped += to_drop
            self.buffer += data
        return True

    def finalize(self) -> None:
        self.done = True

    def total_size(self) -> int:
        return self.prefix_dropped + len(self.buffer)

    def read_once(self, offset: int):
        """One turn of ``read_from``: ("lost",), ("data", bytes), ("end",) or ("wait",)."""
        if offset < self.prefix_dropped:
            return ("lost",)
        logical_end = self.prefix_dropped + len(self.buffer)
        if offset < logical_end:
            return ("data", self.buffer[offset - self.prefix_dropped :])
        if self.done:
            return ("end",)
        return ("wait",)


def ring_read_once(r: Ring, offset: int):
    try:
        step = r.next_step(offset)
    except OffsetLost:
        with pytest.raises(OffsetLost):
            r.read(offset)
        return ("lost",)
    if step is Step.DATA:
        return ("data", r.read(offset))
    assert r.read(offset) == b""
    return (step.value,)


class RingAgainstSeed(RuleBasedStateMachine):
    @initialize(capacity=st.integers(1, 64))
    def start(self, capacity):
        self.capacity = capacity
        self.backing, buffer = guarded(capacity)
        self.ring = Ring(buffer)
        self.seed = SeedSession(capacity)

    @rule(size=st.integers(0, 128), seed=st.integers(0, 2**32 - 1))
    def append(self, size, seed):
        size = size % (2 * self.capacity + 1)  # 0..2*capacity
        data = random.Random(seed).randbytes(size)
        assert self.ring.append(data) == self.seed.append(data)

    @precondition(lambda self: not self.seed.done)
    @rule()
    def finalize(self):
        self.ring.finalize()
        self.seed.finalize()

    @rule(data=st.data())
    def read(self, data):
        total = self.seed.total_size()
        offset = data.draw(st.one_of(
            st.integers(0, total + 2 * self.capacity),  # anywhere, lost and beyond included
            st.integers(max(0, total - self.capacity), total),  # what is still held
            st.just(total),
        ), label="offset")
        assert ring_read_once(self.ring, offset) == self.seed.read_once(offset)

    @rule(data=st.data())
    def read_with_limit(self, data):
        total = self.seed.total_size()
        offset = data.draw(st.integers(self.seed.prefix_dropped, total + 2), label="offset")
        limit = data.draw(st.integers(1, self.capacity + 1), label="limit")
        expected = self.seed.read_once(offset)
        got = self.ring.read(offset, limit=limit)
        if expected[0] == "data":
            assert got == expected[1][:limit]
        else:
            assert got == b""

    @invariant()
    def counters_agree(self):
        if not hasattr(self, "ring"):
            return
        assert self.ring.total == self.seed.total_size()
        assert self.ring.dropped == self.seed.prefix_dropped
        assert self.ring.dropped == max(0, self.ring.total - self.capacity)
        assert self.ring.finished == self.seed.done
        assert guards_intact(self.backing)


RingAgainstSeed.TestCase.settings = settings(max_examples=300, stateful_step_count=40,
                                             deadline=None)
TestRingAgainstSeed = RingAgainstSeed.TestCase
