"""The byte layout of a session segment: the one place that knows where each field lives.

A segment is one POSIX shared-memory object::

    0        8        16       24       32       40       48       56       64
    +--------+--------+--------+--------+--------+--------+--------+--------+
    | magic  |version | state  | flags  |      total      |    allocated    |   0
    +--------+--------+--------+--------+--------+--------+--------+--------+
    |    capacity     |  started_at_us  | completed_at_us |  producer_pid   |  32
    +--------+--------+--------+--------+--------+--------+--------+--------+
    | producer_start  |   lock_owner    | futex  |waiters |meta_len|ring_off|  64
    +--------+--------+--------+--------+--------+--------+--------+--------+
    |   lock_holds    |lock_owner_scope | producer_scope  |    write_end    |  96
    +--------+--------+--------+--------+--------+--------+--------+--------+
    | metadata: one msgpack map (conversation id, model, ...), meta_len B  | 128
    +-----------------------------------------------------------------------+
    | ring: capacity bytes; the byte at stream offset o lives at o % capacity | ring_off
    |   [ring_off, ring_off + allocated): pages reserved (posix_fallocate)    |
    |   [ring_off + allocated, ring_off + capacity): a hole, never touched    |
    +-----------------------------------------------------------------------+

(the ruler counts bytes in 4-byte columns; every u64 is 8-aligned, the futex word 4-aligned)

- ``magic`` and ``version`` form one u64 written *last* by the creator, so a reader that
  finds them has a complete header and metadata.
- ``total`` is the stream offset one past the last byte ever appended. The offset of the
  oldest byte still held, ``dropped``, is not stored: it is ``max(0, total - capacity)``
  (layout 1 stored it next to ``total``, and a reader between the two stores of a full
  ring saw a torn pair).
- ``capacity`` is the ring's modulus and cap; the file is ``ring_off + capacity`` bytes
  long but sparse. ``allocated`` is how many ring bytes have pages reserved now: the ring
  grows (``allocated`` only rises, in :data:`GROWTH_STEP` steps) while ``total`` stays
  below ``capacity``, so no byte ever moves (before the first wrap offset ``o`` sits at
  index ``o``). The producer reserves pages first, then publishes ``allocated``, then
  writes bytes below it: ``total <= allocated <= capacity`` always holds under the lock.
  If ``/dev/shm`` is full the ring stops growing: ``capacity`` is lowered to
  ``allocated`` (consistent, since ``total <= allocated`` and nothing wrapped yet) and
  :data:`FLAG_RING_CAPPED` is set. ``capacity`` never rises.
- ``state`` is a :class:`State`; ``flags`` holds :data:`FLAG_CANCEL`, set by any process
  that cancels and observed by the producer.
- Times are unix microseconds; ``completed_at_us`` is 0 while running.
- ``producer_pid`` + ``producer_start`` (the kernel's start time of that process, in clock
  ticks since boot) identify the producing process without pid-reuse ambiguity.
- ``lock_owner`` is the process holding the segment's semaphore, as one word: its start
  time above its pid (:func:`owner_word`), so one store records a holder. It is 0 when
  the lock is free or between a holder's semaphore call and its record. With
  ``lock_owner_scope`` it lets a waiter recover the lock from a holder that died; with
  ``lock_holds`` (bumped by every hold but an append's) and ``futex`` (bumped by every
  append) it tells one long hold from several short ones (see
  :class:`shmstream.shm.sync.RobustLock`). Layout 3 spent three stores and a wide
  read-modify-write per hold on this, a quarter of an append.
- ``write_end`` is the stream offset an append in progress writes up to, stored before
  the copy: bytes below ``write_end - capacity`` may already be overwritten, so they are
  lost even if the appender died before publishing ``total``.
- ``producer_scope`` and ``lock_owner_scope`` name the boot and pid namespace of those pids
  (:func:`shmstream.store.procs.scope_id`): a pid of another container is never judged by
  our ``/proc``.
- ``futex`` is a doorbell bumped after every publish; ``waiters`` counts readers asleep on
  it that no publish has rung for yet: a producer rings only when it is non-zero and then
  zeroes it, so it makes one wake syscall per sleep, none while nobody sleeps.

Every field is read and written under the segment's semaphore except the doorbell and the
``flags`` peek of the cancel watcher. :meth:`Header.validate` reads without the lock and
therefore checks each field on its own, never one field against another. Stores go
through ``memoryview.cast`` element assignment, which (unlike ``struct.pack_into``) never
exposes a zeroed intermediate value.
"""

from __future__ import annotations

import dataclasses
import mmap

import msgpack

from shmstream.store.ids import MAX_META_BYTES, encode_metadata  # noqa: F401 - layout limits
from shmstream.store.states import State

MAGIC = 0x534D4853  # b"SHMS" little-endian
VERSION = 4  # 1: `dropped` stored, ring reserved up front; 2: no lock stamp, scopes, write_end;
# 3: the lock owner's pid in one field, its start time and a hold count in another
MAGIC_VERSION = MAGIC | (VERSION << 32)

# Byte offsets, computed from a running position so a change to one field moves the rest.
_position = 0


def _field(size: int) -> int:
    global _position
    offset = _position
    assert offset % size == 0, "fields must be naturally aligned"
    _position += size
    return offset


MAGIC_OFFSET = _field(4)
VERSION_OFFSET = _field(4)
STATE_OFFSET = _field(4)
FLAGS_OFFSET = _field(4)
TOTAL_OFFSET = _field(8)
ALLOCATED_OFFSET = _field(8)
CAPACITY_OFFSET = _field(8)
STARTED_AT_OFFSET = _field(8)
COMPLETED_AT_OFFSET = _field(8)
PRODUCER_PID_OFFSET = _field(8)
PRODUCER_START_OFFSET = _field(8)
LOCK_OWNER_OFFSET = _field(8)
FUTEX_OFFSET = _field(4)
WAITERS_OFFSET = _field(4)
META_LENGTH_OFFSET = _field(4)
RING_OFFSET_OFFSET = _field(4)
LOCK_HOLDS_OFFSET = _field(8)
LOCK_OWNER_SCOPE_OFFSET = _field(8)
PRODUCER_SCOPE_OFFSET = _field(8)
WRITE_END_OFFSET = _field(8)
HEADER_SIZE = 128
META_OFFSET = HEADER_SIZE
assert _position <= HEADER_SIZE
del _position

# Element indexes into the u64 and u32 views of the header (offset // size).
MAGIC_VERSION_Q = MAGIC_OFFSET // 8
TOTAL_Q = TOTAL_OFFSET // 8
ALLOCATED_Q = ALLOCATED_OFFSET // 8
CAPACITY_Q = CAPACITY_OFFSET // 8
STARTED_AT_Q = STARTED_AT_OFFSET // 8
COMPLETED_AT_Q = COMPLETED_AT_OFFSET // 8
PRODUCER_PID_Q = PRODUCER_PID_OFFSET // 8
PRODUCER_START_Q = PRODUCER_START_OFFSET // 8
LOCK_OWNER_Q = LOCK_OWNER_OFFSET // 8
LOCK_HOLDS_Q = LOCK_HOLDS_OFFSET // 8
LOCK_OWNER_SCOPE_Q = LOCK_OWNER_SCOPE_OFFSET // 8
PRODUCER_SCOPE_Q = PRODUCER_SCOPE_OFFSET // 8
WRITE_END_Q = WRITE_END_OFFSET // 8
# The lock's record in the u64 view, in the order RobustLock takes its indexes.
LOCK_FIELDS_Q = (LOCK_OWNER_Q, LOCK_OWNER_SCOPE_Q, LOCK_HOLDS_Q)
STATE_I = STATE_OFFSET // 4
FLAGS_I = FLAGS_OFFSET // 4
FUTEX_I = FUTEX_OFFSET // 4
WAITERS_I = WAITERS_OFFSET // 4
META_LENGTH_I = META_LENGTH_OFFSET // 4
RING_OFFSET_I = RING_OFFSET_OFFSET // 4

FLAG_CANCEL = 1
FLAG_RING_CAPPED = 2  # /dev/shm was full when the ring needed to grow; capacity lowered
RING_ALIGN = 64
PAGE = 4096
# Ring bytes reserved at creation and added per growth step: a session holding B bytes
# below the cap reserves at most B + GROWTH_STEP of ring (scripts/bench_store.py measures
# appends/s across steps).
GROWTH_STEP = 64 * 1024


# ``lock_owner``: pid below, start time above. Linux pids stay below 2**22 (PID_MAX_LIMIT);
# 42 bits of clock ticks since boot last a billion years at 100 Hz.
OWNER_PID_BITS = 22
OWNER_PID_MASK = (1 << OWNER_PID_BITS) - 1


def owner_word(pid: int, start: int) -> int:
    """The ``lock_owner`` value naming process ``pid`` started at ``start``."""
    if not 0 < pid <= OWNER_PID_MASK:
        raise ValueError(f"pid {pid} does not fit {OWNER_PID_BITS} bits")
    return (start & ((1 << (64 - OWNER_PID_BITS)) - 1)) << OWNER_PID_BITS | pid


def owner_of(word: int) -> tuple[int, int]:
    """(pid, start time) of a ``lock_owner`` value; (0, 0) for none."""
    return word & OWNER_PID_MASK, word >> OWNER_PID_BITS


class CorruptSegment(Exception):
    """The segment is not a complete shmstream segment of this layout version.

    ``unfinished`` marks the case gc may remove under the registry lock: no magic yet (or
    no semaphore), i.e. a creator that died half-way. Anything else may be a foreign or
    newer segment and is only skipped.
    """

    def __init__(self, message: str, unfinished: bool = False):
        super().__init__(message)
        self.unfinished = unfinished


def has_magic(first_bytes: bytes) -> bool:
    """Whether the segment's first 8 bytes carry the ready marker (any layout version)."""
    return len(first_bytes) >= 8 and int.from_bytes(first_bytes[:4], "little") == MAGIC


def ring_offset_for(meta_length: int) -> int:
    """Where the ring starts after ``meta_length`` bytes of metadata (64-byte aligned)."""
    end = META_OFFSET + meta_length
    return (end + RING_ALIGN - 1) // RING_ALIGN * RING_ALIGN


def segment_size(meta_length: int, capacity: int) -> int:
    """The file size of a segment (sparse beyond its allocated ring)."""
    return ring_offset_for(meta_length) + capacity


def initial_allocation(capacity: int) -> int:
    """Ring bytes reserved when a segment is created."""
    return min(capacity, GROWTH_STEP)


def grown_allocation(allocated: int, needed: int, capacity: int) -> int:
    """The ``allocated`` that holds ring bytes ``[0, needed)``: whole growth steps past
    ``allocated``, at most ``capacity``."""
    if needed <= allocated:
        return allocated
    steps = -(-(needed - allocated) // GROWTH_STEP)
    return min(capacity, allocated + steps * GROWTH_STEP)


class Header:
    """Typed access to one mapped segment's header, metadata and ring.

    The views hold exports of the mapping: call :meth:`release` before closing the mmap.
    """

    __slots__ = ("q", "i", "mapping", "ring", "ring_offset", "meta_length")

    def __init__(self, mapping: mmap.mmap | bytearray):
        self.mapping = mapping
        head = memoryview(mapping)[:HEADER_SIZE]
        self.q = head.cast("Q")
        self.i = head.cast("I")
        head.release()
        self.ring_offset = 0
        self.meta_length = 0
        self.ring: memoryview | None = None

    # --- creation -------------------------------------------------------------------------
    def initialise(
        self,
        *,
        capacity: int,
        allocated: int,
        metadata_record: bytes,
        started_at_us: int,
        producer_pid: int,
        producer_start: int,
        producer_scope: int = 0,
        ready: bool = True,
    ) -> None:
        """Write a fresh header, metadata and an empty ring whose first ``allocated`` bytes
        have pages; magic+version go in last, unless ``ready`` is False: then the caller
        fills more and calls :meth:`mark_ready`."""
        meta_length = len(metadata_record)
        ring_offset = ring_offset_for(meta_length)
        if len(self.mapping) < ring_offset + capacity:
            raise ValueError("mapping is smaller than header + metadata + ring")
        if not 0 < allocated <= capacity:
            raise ValueError("allocated must be within (0, capacity]")
        self.mapping[META_OFFSET : META_OFFSET + meta_length] = metadata_record
        q, i = self.q, self.i
        i[STATE_I] = State.RUNNING
        i[FLAGS_I] = 0
        q[TOTAL_Q] = 0
        q[ALLOCATED_Q] = allocated
        q[CAPACITY_Q] = capacity
        q[STARTED_AT_Q] = started_at_us
        q[COMPLETED_AT_Q] = 0
        q[PRODUCER_PID_Q] = producer_pid
        q[PRODUCER_START_Q] = producer_start
        q[PRODUCER_SCOPE_Q] = producer_scope
        for index in LOCK_FIELDS_Q:
            q[index] = 0
        q[WRITE_END_Q] = 0
        i[FUTEX_I] = 0
        i[WAITERS_I] = 0
        i[META_LENGTH_I] = meta_length
        i[RING_OFFSET_I] = ring_offset
        self._bind_ring()
        if ready:
            self.mark_ready()

    def mark_ready(self) -> None:
        """Write magic+version: from now on other processes can open the segment."""
        self.q[MAGIC_VERSION_Q] = MAGIC_VERSION

    # --- opening --------------------------------------------------------------------------
    def validate(self) -> None:
        """Check magic, version and that every offset stays inside the mapping.

        Runs without the lock while a producer may be appending, so each field is checked
        on its own (``capacity`` only falls, ``allocated`` and ``total`` only rise).
        Raises :class:`CorruptSegment`; after it the header is unusable (call release).
        A segment whose creator has not finished (no magic yet) is reported the same way.
        """
        size = len(self.mapping)
        if size < HEADER_SIZE:
            raise CorruptSegment(f"segment of {size} bytes is smaller than the header")
        magic_version = self.q[MAGIC_VERSION_Q]
        if magic_version & 0xFFFFFFFF != MAGIC:
            raise CorruptSegment("bad magic (not a shmstream segment, or not finished)",
                                 unfinished=True)
        if magic_version >> 32 != VERSION:
            raise CorruptSegment(f"layout version {magic_version >> 32}, expected {VERSION}")
        meta_length = self.i[META_LENGTH_I]
        ring_offset = self.i[RING_OFFSET_I]
        capacity = self.q[CAPACITY_Q]
        if meta_length > MAX_META_BYTES or ring_offset < META_OFFSET + meta_length:
            raise CorruptSegment("metadata overlaps the ring")
        if capacity == 0 or ring_offset + capacity > size:
            raise CorruptSegment("ring extends past the end of the segment")
        if ring_offset + self.q[ALLOCATED_Q] > size:
            raise CorruptSegment("allocated ring extends past the end of the segment")
        if self.i[STATE_I] not in State._value2member_map_:
            raise CorruptSegment(f"unknown state {self.i[STATE_I]}")
        self._bind_ring()

    def _bind_ring(self) -> None:
        # The view spans the whole file (the largest capacity the ring ever had); only
        # its first ``allocated`` bytes have pages, and only bytes below ``total`` are read.
        self.meta_length = self.i[META_LENGTH_I]
        self.ring_offset = self.i[RING_OFFSET_I]
        self.ring = memoryview(self.mapping)[self.ring_offset :]

    def metadata(self) -> dict:
        record = bytes(self.mapping[META_OFFSET : META_OFFSET + self.meta_length])
        try:
            value = msgpack.unpackb(record, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise CorruptSegment(f"metadata is not msgpack: {exc}") from None
        if not isinstance(value, dict):
            raise CorruptSegment("metadata is not a map")
        return value

    # --- fields ---------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return State(self.i[STATE_I])

    @property
    def flags(self) -> int:
        return self.i[FLAGS_I]

    @property
    def total(self) -> int:
        return self.q[TOTAL_Q]

    @property
    def allocated(self) -> int:
        return self.q[ALLOCATED_Q]

    @property
    def capacity(self) -> int:
        return self.q[CAPACITY_Q]

    @property
    def dropped(self) -> int:
        """Derived from ``total`` and ``capacity``: read it under the lock."""
        total, capacity = self.q[TOTAL_Q], self.q[CAPACITY_Q]
        return total - capacity if total > capacity else 0

    @property
    def started_at_us(self) -> int:
        return self.q[STARTED_AT_Q]

    @property
    def completed_at_us(self) -> int:
        return self.q[COMPLETED_AT_Q]

    @property
    def producer_pid(self) -> int:
        return self.q[PRODUCER_PID_Q]

    @property
    def producer_start(self) -> int:
        return self.q[PRODUCER_START_Q]

    @property
    def lock_owner_pid(self) -> int:
        return owner_of(self.q[LOCK_OWNER_Q])[0]

    @property
    def lock_holds(self) -> int:
        return self.q[LOCK_HOLDS_Q]

    @property
    def lock_owner_scope(self) -> int:
        return self.q[LOCK_OWNER_SCOPE_Q]

    @property
    def producer_scope(self) -> int:
        return self.q[PRODUCER_SCOPE_Q]

    @property
    def producer(self) -> tuple[int, int, int]:
        """(pid, start time, pid-namespace scope): what ``procs.liveness`` judges."""
        return self.producer_pid, self.producer_start, self.producer_scope

    @property
    def write_end(self) -> int:
        return self.q[WRITE_END_Q]

    @property
    def futex_word(self) -> int:
        return self.i[FUTEX_I]

    @property
    def waiters(self) -> int:
        return self.i[WAITERS_I]

    def release(self) -> None:
        """Drop every view of the mapping so it can be closed."""
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        self.q.release()
        self.i.release()


@dataclasses.dataclass(frozen=True)
class Glance:
    """What a header's first bytes tell without the segment's lock or a mapping (the
    supervisor's reaper meets each new session once this way): its state, a snapshot
    that may be stale at once (a terminal state never changes again), and its producer's
    identity, written once before the magic."""

    state: State
    producer: tuple[int, int, int]  # (pid, start time, pid-namespace scope)


def glance(head: bytes) -> Glance | None:
    """The :class:`Glance` of a header read as bytes; None unless it is a finished header
    of this layout version with a known state."""
    if len(head) < HEADER_SIZE:
        return None
    header = Header(bytearray(head[:HEADER_SIZE]))
    try:
        if header.q[MAGIC_VERSION_Q] != MAGIC_VERSION or \
                header.i[STATE_I] not in State._value2member_map_:
            return None
        return Glance(header.state, header.producer)
    finally:
        header.release()
