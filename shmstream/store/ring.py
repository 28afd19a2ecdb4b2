"""Ring arithmetic over any writable buffer, with the seed's semantics; no I/O, no locks.

Offsets are absolute stream positions that only grow. The byte at offset ``o`` lives at
``o % capacity``; the ring always holds the last ``min(total, capacity)`` bytes, so
``dropped == max(0, total - capacity)``. Appending costs O(len(data)), never O(held bytes).

Callers own the ``total`` counter (a header field in shared memory, a Python attribute in
:class:`Ring`) and hold whatever lock guards it while calling these functions.
"""

from __future__ import annotations

import enum

from shmstream.store.errors import OffsetLost


def dropped_for(total: int, capacity: int) -> int:
    """Offset of the oldest byte held once ``total`` bytes went through ``capacity``."""
    return total - capacity if total > capacity else 0


def write(ring, capacity: int, total: int, data) -> int:
    """Copy ``data`` in at stream offset ``total``; return the new total.

    A chunk longer than the ring keeps only its last ``capacity`` bytes, exactly as if it
    had been appended byte by byte.
    """
    length = len(data)
    if length >= capacity:
        skip = length - capacity
        new_total = total + length
        start = new_total - capacity  # == total + skip: the first byte kept
        position = start % capacity
        first = capacity - position
        view = memoryview(data)
        ring[position:capacity] = view[skip : skip + first]
        if first < capacity:
            ring[0 : capacity - first] = view[skip + first :]
        return new_total
    position = total % capacity
    end = position + length
    if end <= capacity:
        ring[position:end] = data
    else:
        first = capacity - position
        view = memoryview(data)
        ring[position:capacity] = view[:first]
        ring[0 : length - first] = view[first:]
    return total + length


def read(ring, capacity: int, total: int, offset: int, limit: int | None = None) -> bytes:
    """Return the held bytes ``[offset, total)`` (at most ``limit`` of them).

    Raises :class:`OffsetLost` when ``offset`` is older than the oldest held byte. Returns
    ``b""`` when ``offset >= total``. Never touches ring bytes past ``total`` (on tmpfs that
    would allocate never-written pages).
    """
    if offset < dropped_for(total, capacity):
        raise OffsetLost()
    if offset >= total:
        return b""
    end = total if limit is None else min(total, offset + limit)
    position = offset % capacity
    length = end - offset
    if position + length <= capacity:
        return bytes(ring[position : position + length])
    first = capacity - position
    return bytes(ring[position:capacity]) + bytes(ring[0 : length - first])


class Step(enum.Enum):
    """What a reader at some offset does next."""

    DATA = "data"  # bytes are available now
    WAIT = "wait"  # nothing new yet and the session still runs
    END = "end"  # the session is finished and the reader has everything


def next_step(total: int, capacity: int, finished: bool, offset: int) -> Step:
    """The seed's ``read_from`` decision. Raises :class:`OffsetLost` for a lapped offset."""
    if offset < dropped_for(total, capacity):
        raise OffsetLost()
    if offset < total:
        return Step.DATA
    return Step.END if finished else Step.WAIT


class Ring:
    """A whole session ring in one process: the seed's ``stream_session`` without threads.

    Used as the executable reference in tests and as the in-process building block; the
    shared-memory session applies the same functions to its mapped header and ring.
    """

    def __init__(self, buffer, capacity: int | None = None):
        self.buffer = buffer
        self.capacity = len(buffer) if capacity is None else capacity
        if self.capacity <= 0:
            raise ValueError("capacity must be positive")
        self.total = 0
        self.finished = False

    @property
    def dropped(self) -> int:
        return dropped_for(self.total, self.capacity)

    def append(self, data) -> bool:
        """Append; False once finalized (an empty append is always a successful no-op)."""
        if len(data) == 0:
            return True
        if self.finished:
            return False
        self.total = write(self.buffer, self.capacity, self.total, data)
        return True

    def finalize(self) -> None:
        self.finished = True

    def next_step(self, offset: int) -> Step:
        return next_step(self.total, self.capacity, self.finished, offset)

    def read(self, offset: int, limit: int | None = None) -> bytes:
        return read(self.buffer, self.capacity, self.total, offset, limit)
