"""The segment layout on a bytearray: offsets, the ready marker, validation, metadata."""

from __future__ import annotations

import itertools
import mmap

import msgpack
import pytest

from shmstream.shm import layout
from shmstream.shm.layout import CorruptSegment, Header, State

FIELD_SIZES = {
    "MAGIC": 4, "VERSION": 4, "STATE": 4, "FLAGS": 4, "TOTAL": 8, "ALLOCATED": 8,
    "CAPACITY": 8, "STARTED_AT": 8, "COMPLETED_AT": 8, "PRODUCER_PID": 8,
    "PRODUCER_START": 8, "LOCK_OWNER": 8, "FUTEX": 4, "WAITERS": 4, "META_LENGTH": 4,
    "RING_OFFSET": 4, "LOCK_HOLDS": 8, "LOCK_OWNER_SCOPE": 8, "PRODUCER_SCOPE": 8,
    "WRITE_END": 8,
}


def make_header(capacity: int = 256, metadata: dict | None = None, slack: int = 0,
                allocated: int | None = None):
    record = layout.encode_metadata(metadata if metadata is not None else {"id": "abc"})
    buffer = bytearray(layout.segment_size(len(record), capacity) + slack)
    header = Header(buffer)
    header.initialise(capacity=capacity, allocated=allocated or capacity,
                      metadata_record=record, started_at_us=1_000_000,
                      producer_pid=4242, producer_start=77)
    return buffer, header


def reopen(buffer) -> Header:
    """A second view of the same bytes, as another process would map them."""
    return Header(buffer)


def assert_corrupt(buffer, match: str) -> None:
    header = reopen(buffer)
    try:
        with pytest.raises(CorruptSegment, match=match):
            header.validate()
    finally:
        header.release()


# --- offsets --------------------------------------------------------------------------------


def test_every_field_is_naturally_aligned_inside_the_header_and_disjoint():
    spans = []
    for name, size in FIELD_SIZES.items():
        offset = getattr(layout, f"{name}_OFFSET")
        assert offset % size == 0, f"{name} at {offset} is not {size}-aligned"
        assert offset + size <= layout.HEADER_SIZE, f"{name} ends past the header"
        spans.append((offset, offset + size, name))
    spans.sort()
    for (_, end, name), (start, _, following) in itertools.pairwise(spans):
        assert end <= start, f"{name} overlaps {following}"
    assert layout.FUTEX_OFFSET % 4 == 0  # futex(2) needs a 4-aligned word
    assert layout.HEADER_SIZE % 8 == 0
    assert layout.META_OFFSET >= layout.HEADER_SIZE


def test_view_indexes_match_byte_offsets():
    for name, size in FIELD_SIZES.items():
        offset = getattr(layout, f"{name}_OFFSET")
        suffix = "_Q" if size == 8 else "_I"
        index_name = "MAGIC_VERSION_Q" if name in ("MAGIC", "VERSION") else name + suffix
        if name == "VERSION":
            continue  # shares the u64 with magic
        assert getattr(layout, index_name) == offset // size, name


def test_magic_and_version_share_one_u64_little_endian():
    buffer, header = make_header()
    assert int.from_bytes(buffer[layout.MAGIC_OFFSET : layout.MAGIC_OFFSET + 4], "little") \
        == layout.MAGIC
    assert int.from_bytes(buffer[layout.VERSION_OFFSET : layout.VERSION_OFFSET + 4], "little") \
        == layout.VERSION
    header.release()


def test_ring_offset_is_aligned_after_the_metadata():
    for meta_length in (0, 1, 63, 64, 65, 1000, layout.MAX_META_BYTES):
        ring_offset = layout.ring_offset_for(meta_length)
        assert ring_offset % layout.RING_ALIGN == 0
        assert ring_offset >= layout.META_OFFSET + meta_length
        assert ring_offset - (layout.META_OFFSET + meta_length) < layout.RING_ALIGN
        assert layout.segment_size(meta_length, 100) == ring_offset + 100


# --- creation order -------------------------------------------------------------------------


class RecordingView:
    """Wraps a cast memoryview and logs every store, in order, into a shared list."""

    def __init__(self, view, kind: str, log: list):
        self.view, self.kind, self.log = view, kind, log

    def __getitem__(self, index):
        return self.view[index]

    def __setitem__(self, index, value):
        self.log.append((self.kind, index))
        self.view[index] = value

    def release(self):
        self.view.release()


def test_magic_is_written_last_and_once():
    record = layout.encode_metadata({"id": "x"})
    buffer = bytearray(layout.segment_size(len(record), 64))
    header = Header(buffer)
    stores: list = []
    header.q = RecordingView(header.q, "q", stores)
    header.i = RecordingView(header.i, "i", stores)
    header.initialise(capacity=64, allocated=64, metadata_record=record, started_at_us=1,
                      producer_pid=2, producer_start=3)
    assert stores[-1] == ("q", layout.MAGIC_VERSION_Q)
    assert stores.count(("q", layout.MAGIC_VERSION_Q)) == 1
    header.release()


def test_a_header_without_magic_fails_validate():
    buffer, header = make_header()
    header.q[layout.MAGIC_VERSION_Q] = 0  # as a creator that has not finished yet
    header.release()
    assert_corrupt(buffer, "bad magic")
    assert_corrupt(bytearray(4096), "bad magic")  # a fresh, zeroed segment


def test_initialise_refuses_a_mapping_that_is_too_small():
    record = layout.encode_metadata({"id": "x"})
    buffer = bytearray(layout.segment_size(len(record), 64) - 1)
    header = Header(buffer)
    with pytest.raises(ValueError):
        header.initialise(capacity=64, allocated=64, metadata_record=record, started_at_us=1,
                          producer_pid=2, producer_start=3)
    header.release()
    assert_corrupt(buffer, "bad magic")  # nothing was marked ready


# --- validate -------------------------------------------------------------------------------


def test_a_fresh_header_validates_with_its_fields():
    buffer, header = make_header(capacity=256)
    header.release()
    again = reopen(buffer)
    again.validate()
    assert again.state is State.RUNNING
    assert (again.total, again.dropped, again.capacity) == (0, 0, 256)
    assert again.started_at_us == 1_000_000 and again.completed_at_us == 0
    assert (again.producer_pid, again.producer_start) == (4242, 77)
    assert (again.lock_owner_pid, again.futex_word, again.waiters, again.flags) == (0, 0, 0, 0)
    assert again.ring is not None and len(again.ring) == 256
    assert again.ring_offset % layout.RING_ALIGN == 0
    again.release()


def lying(field: str, value):
    """A mutation of a valid header that must be rejected."""
    def mutate(header: Header):
        kind, index = field.rsplit("_", 1)[1], getattr(layout, field)
        (header.q if kind == "Q" else header.i)[index] = value
    return mutate


@pytest.mark.parametrize(("mutate", "match"), [
    (lying("CAPACITY_Q", 10**6), "past the end"),
    (lying("CAPACITY_Q", 0), "past the end"),
    (lying("RING_OFFSET_I", 2**31), "past the end"),
    (lying("RING_OFFSET_I", 0), "overlaps"),
    (lying("META_LENGTH_I", layout.MAX_META_BYTES + 1), "overlaps"),
    (lying("ALLOCATED_Q", 10**6), "allocated ring extends past the end"),
    (lying("STATE_I", 99), "unknown state"),
    (lying("MAGIC_VERSION_Q", layout.MAGIC | ((layout.VERSION + 1) << 32)), "version"),
    (lying("MAGIC_VERSION_Q", layout.MAGIC | (1 << 32)), "layout version 1, expected 4"),
    (lying("MAGIC_VERSION_Q", layout.MAGIC | (2 << 32)), "layout version 2, expected 4"),
    (lying("MAGIC_VERSION_Q", layout.MAGIC | (3 << 32)), "layout version 3, expected 4"),
    (lying("MAGIC_VERSION_Q", layout.MAGIC_VERSION ^ 1), "bad magic"),
], ids=["ring-past-end", "zero-capacity", "ring-offset-past-end", "ring-over-header",
        "huge-metadata", "allocated-past-end", "unknown-state", "newer-version",
        "version-1", "version-2 (no scopes)", "version-3 (two-field lock owner)", "bad-magic"])
def test_validate_rejects_lying_headers(mutate, match):
    buffer, header = make_header(capacity=256)
    mutate(header)
    header.release()
    assert_corrupt(buffer, match)


def test_validate_accepts_a_wrapped_ring_and_rejects_a_short_mapping():
    buffer, header = make_header(capacity=256)
    header.q[layout.TOTAL_Q] = 10_000
    header.release()
    again = reopen(buffer)
    again.validate()
    assert (again.total, again.dropped) == (10_000, 10_000 - 256)  # derived, never stored
    again.release()
    with pytest.raises(CorruptSegment, match="smaller than the header"):
        Header(bytearray(layout.HEADER_SIZE - 8)).validate()


def test_every_state_value_validates():
    for state in State:
        buffer, header = make_header()
        header.i[layout.STATE_I] = state
        header.release()
        again = reopen(buffer)
        again.validate()
        assert again.state is state
        assert again.state.is_terminal == (state is not State.RUNNING)
        again.release()
    assert [s.label for s in State] == ["running", "done", "cancelled", "failed", "aborted"]


# --- metadata -------------------------------------------------------------------------------


def test_metadata_roundtrip():
    metadata = {"id": "chat/1::org/model\x00🙂", "model": "m", "n": 3, "nested": {"a": [1, 2]},
                "raw": b"\x00\xff"}
    buffer, header = make_header(metadata=metadata)
    header.release()
    again = reopen(buffer)
    again.validate()
    assert again.metadata() == metadata
    again.release()


def test_metadata_limit_and_garbage():
    with pytest.raises(ValueError):
        layout.encode_metadata({"id": "x" * (layout.MAX_META_BYTES + 1)})
    # A record that is not msgpack, and one that is msgpack but not a map.
    for record in (b"\xc1" * 8, msgpack.packb([1, 2, 3])):
        buffer = bytearray(layout.segment_size(len(record), 64))
        header = Header(buffer)
        header.initialise(capacity=64, allocated=64, metadata_record=record, started_at_us=1,
                          producer_pid=1, producer_start=1)
        with pytest.raises(CorruptSegment):
            header.metadata()
        header.release()


def test_release_lets_a_real_mapping_close():
    record = layout.encode_metadata({"id": "x"})
    mapping = mmap.mmap(-1, layout.segment_size(len(record), 4096))
    header = Header(mapping)
    header.initialise(capacity=4096, allocated=4096, metadata_record=record,
                      started_at_us=1, producer_pid=1,
                      producer_start=1)
    with pytest.raises(BufferError):
        mapping.close()  # the views pin the mapping until released
    header.release()
    mapping.close()


# --- growth ---------------------------------------------------------------------------------


def test_growth_goes_in_whole_steps_and_stops_at_the_capacity():
    step, cap = layout.GROWTH_STEP, 4 * 1024 * 1024
    assert layout.initial_allocation(cap) == step
    assert layout.initial_allocation(1000) == 1000  # a small ring is whole from the start
    assert layout.grown_allocation(step, step, cap) == step  # fits: no growth
    assert layout.grown_allocation(step, step + 1, cap) == 2 * step
    assert layout.grown_allocation(step, 5 * step - 1, cap) == 5 * step  # one big append
    assert layout.grown_allocation(cap - 10, cap, cap) == cap
    assert layout.grown_allocation(step, 10 * cap, cap) == cap
    for needed in range(1, 3 * step, 997):  # never more than one step beyond what is needed
        grown = layout.grown_allocation(step, needed, cap)
        assert needed <= grown < max(needed, step) + step


def test_a_header_records_allocated_and_derives_dropped_from_total_and_capacity():
    _buffer, header = make_header(capacity=256, allocated=64)
    assert (header.allocated, header.capacity, header.dropped) == (64, 256, 0)
    header.q[layout.TOTAL_Q] = 300
    assert header.dropped == 300 - 256
    header.q[layout.CAPACITY_Q] = 64  # a ring capped at what it had
    assert header.dropped == 300 - 64
    header.release()
    with pytest.raises(ValueError):
        make_header(capacity=256, allocated=257)


def test_validate_never_compares_two_fields_read_apart():
    # Any total is consistent with any capacity now that dropped is derived: the torn pair
    # of layout 1 (total stored before dropped) cannot exist.
    for total in (0, 255, 256, 257, 10**12):
        buffer, header = make_header(capacity=256, allocated=128)
        header.q[layout.TOTAL_Q] = total
        header.release()
        again = reopen(buffer)
        again.validate()
        assert again.dropped == max(0, total - 256)
        again.release()


def test_the_lock_owner_word_holds_pid_and_start_time_in_one_u64():
    pid_max = (1 << layout.OWNER_PID_BITS) - 1  # Linux's PID_MAX_LIMIT is 2**22
    start = (1 << 42) - 1  # a billion years of 100 Hz ticks
    for pid, started in [(1, 0), (4242, 77), (pid_max, start)]:
        word = layout.owner_word(pid, started)
        assert 0 < word < 1 << 64
        assert layout.owner_of(word) == (pid, started)
    assert layout.owner_of(0) == (0, 0)  # a free lock names no process
    for bad in (0, pid_max + 1):
        with pytest.raises(ValueError):
            layout.owner_word(bad, 1)
