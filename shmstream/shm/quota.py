"""A namespace's quotas (``max_sessions``, ``max_shm_bytes``), counted in allocated pages.

Sessions grow after they are created, so the byte quota is checked twice: at creation
(what the new session allocates at once) and before each growth step of a ring (a ring
that may not grow is capped, see :meth:`Segment.make_room`). Counting stats every
segment of the namespace (retired segments still mapped included), so a process recounts
at most every :data:`RECOUNT_INTERVAL` and adds its own creations and growth in between:
a soft bound, exceeded at most by what other processes created and grew within one
interval. The session quota reads the lookup index's count (shm/names.py), and lists
/dev/shm only when that count says the limit is reached.
"""

from __future__ import annotations

import time

from shmstream.shm import layout, segment
from shmstream.store.errors import StoreUnavailable

RECOUNT_INTERVAL = 1.0  # seconds a process reuses its count of the namespace's bytes


def pages(size: int) -> int:
    """``size`` rounded up to whole pages (what tmpfs allocates)."""
    return -(-size // layout.PAGE) * layout.PAGE


class Quota:
    """The quotas of one store in one process (thread-safe enough: a stale count only
    moves the soft bound)."""

    def __init__(self, namespace: str, max_sessions: int | None, max_shm_bytes: int | None,
                 capacity: int):
        self.namespace = namespace
        self.max_sessions = max_sessions
        self.max_shm_bytes = max_shm_bytes
        self.capacity = capacity
        self._counted_bytes = 0  # the namespace's allocated bytes as last counted ...
        self._counted_at = -RECOUNT_INTERVAL  # ... at this monotonic time

    def check_creation(self, conversation_id: str) -> None:
        """Raise StoreUnavailable if one more session does not fit. Registry lock held."""
        if self.max_sessions is None and self.max_shm_bytes is None:
            return
        if self.max_sessions is not None and \
                segment.indexed_count(self.namespace) >= self.max_sessions:
            # At the limit by the index's count: list /dev/shm to be sure (the count may
            # be off by a creator killed midway), drop debris, and set the count right.
            names = segment.list_names(self.namespace)
            if len(names) >= self.max_sessions:
                names = segment.without_debris(self.namespace, names)
            segment.set_indexed_count(self.namespace, len(names))
            if len(names) >= self.max_sessions:
                raise StoreUnavailable(f"session quota reached ({self.max_sessions} sessions)")
        if self.max_shm_bytes is not None:
            # Recounted at most every RECOUNT_INTERVAL, as for growth: counting stats every
            # segment, which at each creation made creating O(sessions).
            fresh = time.monotonic() - self._counted_at <= RECOUNT_INTERVAL
            used = self._counted_bytes if fresh else self._count()
            record = layout.encode_metadata({"id": conversation_id})
            # What a new session allocates at once: header, metadata (+64 B of the
            # caller's), its first ring step, and its semaphore's page.
            needed = pages(layout.ring_offset_for(len(record) + 64)
                            + layout.initial_allocation(self.capacity)) + layout.PAGE
            if used + needed > self.max_shm_bytes and fresh:
                used = self._count()  # at the limit by the count kept: count to be sure
            if used + needed > self.max_shm_bytes:
                raise StoreUnavailable(
                    f"shared-memory quota reached ({used} of {self.max_shm_bytes} bytes used)"
                )
            self._counted_bytes = used + needed  # what growth checks count from next

    def allows_growth(self, extra: int) -> int:
        """How many of ``extra`` bytes a ring may grow by now (all, or what is left)."""
        if time.monotonic() - self._counted_at > RECOUNT_INTERVAL:
            self._count()
        allowed = max(0, min(extra, self.max_shm_bytes - self._counted_bytes))
        self._counted_bytes += allowed
        return allowed

    def _count(self) -> int:
        self._counted_bytes = segment.namespace_allocated_bytes(self.namespace)
        self._counted_at = time.monotonic()
        return self._counted_bytes
