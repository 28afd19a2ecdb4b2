"""Session segments: naming, creating, opening, growing, retiring and mapping.

Each session is one POSIX shared-memory object plus one named semaphore of the same name.
Names never contain the conversation id: they are ``<namespace>.<base hash><id hash>``,
where the base hash covers the id up to its first ``::``, so every ``X::model`` session
of ``X`` shares a prefix.

- **Names and the lookup index** live in :mod:`shmstream.shm.names`.
- **Growth.** The file is ``ring_off + capacity`` bytes long but sparse: pages are
  reserved (``posix_fallocate``) for the header, metadata and the first ring step at
  creation, and for each further step by :meth:`Segment.grow` before any byte lands
  there. Every handle maps the whole file once, so a reader never remaps and never
  touches a page that was not reserved (it reads only below ``total``).
- **Retiring.** Every handle holds a shared ``flock`` on its segment's open file, which
  the kernel keeps while the mapping exists (also after the fd is closed) and drops when
  the process dies. A replaced, evicted or expired segment that some handle still maps is
  renamed ``<namespace>.r<name hash>.<unique>`` instead of unlinked, so its pages still
  count against quotas and in ``/metrics``; :func:`collect_retired` unlinks it once an
  exclusive ``flock`` shows nobody maps it any more.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import posix_ipc

from shmstream.shm import layout
from shmstream.shm.names import (  # noqa: F401 - segment is the shm modules' one entry
    PERMISSIONS,
    SHM_DIR,
    add_to_index,
    base_prefix,
    directory_mtime_ns,
    index_dir,
    indexed_count,
    indexed_names,
    is_indexed,
    list_name_inodes,
    list_names,
    list_retired,
    lookup_prefixes,
    name_pattern,
    prefix_of,
    remove_from_index,
    remove_index,
    retired_pattern,
    segment_name,
    set_indexed_count,
    shm_entries,
)
from shmstream.shm.sync import Doorbell, RobustLock
from shmstream.store import faults
from shmstream.store.errors import StoreUnavailable
from shmstream.store.ids import (  # noqa: F401 - re-exported for the shm tools
    base_id,
    encode_id,
    short_hash,
    validate_namespace,
)

_NO_ROOM = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)
# An object without the ready marker (or semaphore) this long after its last change is a
# dead creator's or retirer's (they finish in microseconds, under the registry lock): gc
# removes it, and quotas never count it.
DEBRIS_GRACE = 2.0


# --- accounting ----------------------------------------------------------------------------


def allocated_bytes(name: str) -> int:
    """Bytes of /dev/shm the object ``name`` occupies (its pages, ``du``-style); 0 if gone."""
    try:
        return os.stat(os.path.join(SHM_DIR, name)).st_blocks * 512
    except FileNotFoundError:
        return 0


def glance(name: str) -> tuple[int, layout.Glance | None] | None:
    """(inode, :func:`layout.glance` of its header) of the object ``name``, read with one
    pread: no mapping, semaphore or lock, and invisible to :func:`retire` (it takes no
    flock). None if gone."""
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.fstat(fd).st_ino, layout.glance(os.pread(fd, layout.HEADER_SIZE, 0))
    finally:
        os.close(fd)


def namespace_allocated_bytes(namespace: str) -> int:
    """Pages held by every segment and semaphore of ``namespace``, retired segments still
    mapped included (index entries and lock files hold no pages)."""
    names, retired = name_pattern(namespace), retired_pattern(namespace)
    start, semaphores = namespace + ".", "sem." + namespace + "."
    return sum(allocated_bytes(e) for e in shm_entries()
               if (e.startswith(start) and (names.fullmatch(e) or retired.fullmatch(e)))
               or (e.startswith(semaphores) and names.fullmatch(e, 4)))


def list_orphan_semaphores(namespace: str) -> list[str]:
    """Semaphore names of ``namespace`` whose segment is gone (a creator died mid-way)."""
    live = set(list_names(namespace))
    prefix = f"sem.{namespace}."
    return [
        entry[4:]
        for entry in os.listdir(SHM_DIR)
        if entry.startswith(prefix) and entry[4:] not in live
    ]


def registry_lock_path(namespace: str) -> str:
    """A small file whose flock serialises create/replace/unlink within a namespace."""
    return os.path.join(SHM_DIR, f"{namespace}.lock")


def recovery_lock_path(namespace: str) -> str:
    """A second flock file that serialises taking over locks from dead holders. Separate
    from the registry lock because recovery can happen while the registry lock is held."""
    return os.path.join(SHM_DIR, f"{namespace}.recover")


def reserve_pages(fd: int, size: int, start: int = 0) -> None:
    """Reserve tmpfs pages for bytes ``[start, size)`` of ``fd`` now, so a full /dev/shm
    fails here with ENOSPC instead of SIGBUS on the first write (the OS seam tests inject
    failures into)."""
    os.posix_fallocate(fd, start, size - start)


def unfinished_age(name: str, now: float | None = None) -> float | None:
    """Seconds since an *unfinished* object ``name`` (no ready marker, or no semaphore)
    last changed; None if it is finished or gone.

    Reads 8 bytes with ``pread``: it never maps the object, so it never allocates pages.
    """
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        stat = os.fstat(fd)
        ready = (stat.st_size >= layout.HEADER_SIZE
                 and layout.has_magic(os.pread(fd, 8, layout.MAGIC_OFFSET)))
    finally:
        os.close(fd)
    if ready and os.path.exists(os.path.join(SHM_DIR, "sem." + name)):
        return None
    now = time.time() if now is None else now
    return max(0.0, now - max(stat.st_mtime, stat.st_ctime))


def without_debris(namespace: str, names: list[str]) -> list[str]:
    """``names`` minus unfinished objects, which are removed: call under the exclusive
    registry lock, where no creator is midway, so they can only be dead creators' debris
    (they must never fill a quota)."""
    kept = []
    for name in names:
        if unfinished_age(name) is None:
            kept.append(name)
        else:
            retire(namespace, name)
    return kept


def unlink(name: str) -> None:
    """Remove a session's shared memory and semaphore names; missing ones are fine.

    Processes that still map the segment keep a valid mapping until they close it.
    """
    # The object first: a crash between the two leaves an orphan semaphore, which gc
    # removes; the other order would leave an object without semaphore that opens fail on.
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory("/" + name)
    if faults.hook is not None:
        faults.hook("unlink.half")
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore("/" + name)


def _unmapped_everywhere(path: str) -> bool:
    """True if no handle in any process maps the object at ``path`` (see the module doc)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def retire(namespace: str, name: str) -> bool:
    """Remove session ``name`` from the namespace: its index entry, semaphore name and
    segment name. A segment still mapped somewhere is renamed to a retired name (its pages
    stay counted) rather than unlinked. Registry lock held exclusively. True if it was
    renamed."""
    remove_from_index(namespace, name)
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore("/" + name)
    if faults.hook is not None:
        faults.hook("retire.half")  # left: a segment without semaphore, gc's debris
    path = os.path.join(SHM_DIR, name)
    if _unmapped_everywhere(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return False
    retired = f"{namespace}.r{name[len(namespace) + 1 :]}.{uuid.uuid4().hex[:12]}"
    try:
        os.rename(path, os.path.join(SHM_DIR, retired))
    except FileNotFoundError:
        return False
    return True


def collect_retired(namespace: str) -> int:
    """Unlink the retired segments nobody maps any more. Returns how many."""
    removed = 0
    for name in list_retired(namespace):
        path = os.path.join(SHM_DIR, name)
        if _unmapped_everywhere(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed


@dataclass(eq=False)
class Segment:
    """One mapped session segment with its lock and doorbell. Close it when done."""

    name: str
    mapping: mmap.mmap
    header: layout.Header
    semaphore: posix_ipc.Semaphore
    lock: RobustLock
    doorbell: Doorbell
    inode: int = 0  # the object's inode: growth reopens it by name only if it is this one
    fd: int | None = None  # kept by the creator (the producer) for growth; else opened then
    _holders: int = 1  # handles sharing this mapping (see retain)
    _holders_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def _attach(cls, name: str, mapping: mmap.mmap, semaphore: posix_ipc.Semaphore,
                header: layout.Header, guard_path: str, inode: int,
                fd: int | None = None) -> Segment:
        lock = RobustLock(semaphore, header.q, header.i, layout.LOCK_FIELDS_Q, layout.FUTEX_I,
                          guard_path)
        return cls(name, mapping, header, semaphore, lock,
                   Doorbell(mapping, layout.FUTEX_OFFSET), inode, fd)

    def still_named(self) -> bool:
        """Whether our name still refers to this object (not retired, not replaced).
        Meaningful under the registry lock."""
        try:
            return os.stat(os.path.join(SHM_DIR, self.name)).st_ino == self.inode
        except FileNotFoundError:
            return False

    def grow(self, needed: int) -> int:
        """Reserve pages for ring bytes ``[0, needed)`` (whole growth steps, at most the
        capacity), then publish the new ``allocated``, and return it. Call holding the
        segment's lock, before writing any byte past the old ``allocated``.

        Raises OSError: ENOSPC/ENOMEM when /dev/shm is full, FileNotFoundError when this
        handle has no descriptor and the name no longer leads to this segment.
        """
        header = self.header
        q = header.q
        allocated = q[layout.ALLOCATED_Q]
        target = layout.grown_allocation(allocated, needed, q[layout.CAPACITY_Q])
        if target > allocated:
            reserve_pages(self._growth_fd(), header.ring_offset + target,
                          header.ring_offset + allocated)
            q[layout.ALLOCATED_Q] = target  # a single u64 store, after the pages exist
        return target

    def make_room(self, needed: int, may_grow: Callable[[int], int] | None) -> str | None:
        """Lock held, before writing up to stream offset ``needed``: grow the ring so its
        bytes ``[0, min(needed, capacity))`` have pages. If /dev/shm (or the quota,
        ``may_grow(extra) -> bytes allowed``) has no room, stop growing instead:
        ``capacity = allocated``, which keeps every held byte where it is (``total <=
        allocated`` and nothing wrapped yet), and set FLAG_RING_CAPPED. Returns why it
        capped the ring, or None."""
        q = self.header.q
        capacity, allocated = q[layout.CAPACITY_Q], q[layout.ALLOCATED_Q]
        if allocated >= capacity:
            return None
        wanted = min(needed, capacity)
        reason = None
        if may_grow is not None:
            extra = layout.grown_allocation(allocated, wanted, capacity) - allocated
            allowed = may_grow(extra)
            if allowed < extra:  # grow by the whole steps the quota has left
                reason = "the shared-memory quota is reached"
                wanted = allocated + allowed // layout.GROWTH_STEP * layout.GROWTH_STEP
        try:
            allocated = self.grow(wanted)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if wanted > allocated + layout.GROWTH_STEP:
                with contextlib.suppress(OSError):  # a single step may still fit
                    allocated = self.grow(allocated + 1)
        if reason is not None:
            q[layout.CAPACITY_Q] = allocated
            self.header.i[layout.FLAGS_I] |= layout.FLAG_RING_CAPPED
        return reason

    def _growth_fd(self) -> int:
        if self.fd is None:
            fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDWR | os.O_CLOEXEC)
            if os.fstat(fd).st_ino != self.inode:
                os.close(fd)
                raise FileNotFoundError(errno.ENOENT, "the segment was replaced", self.name)
            self.fd = fd
        return self.fd

    def retain(self) -> Segment:
        """One more holder of this mapping: it is unmapped when the last holder closes."""
        with self._holders_lock:
            self._holders += 1
        return self

    def close(self) -> None:
        """Release this holder; the last one unmaps and closes this process's handles (the
        segment itself stays)."""
        with self._holders_lock:
            self._holders -= 1
            if self._holders:
                return
        self.doorbell.close()
        self.header.release()
        self.mapping.close()  # drops this handle's shared flock (see the module doc)
        self.semaphore.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _no_room(what: str, exc: OSError) -> StoreUnavailable:
    return StoreUnavailable(f"no room in {SHM_DIR} for {what} ({exc.strerror})")


def create(namespace: str, conversation_id: str, *, capacity: int, metadata: dict,
           started_at_us: int, producer_pid: int, producer_start: int,
           producer_scope: int = 0, reserve: int = 0,
           fill: Callable[[layout.Header], None] | None = None) -> Segment:
    """Create a session's segment and semaphore (mode 0600), initialised and indexed, with
    pages reserved for its header, metadata and first ring step, or ``reserve`` ring bytes
    if more (the rest of the file is a hole until :meth:`Segment.grow`). The returned
    segment keeps its fd for growth.

    ``fill(header)``, if given, writes more (a restored ring) before the ready marker, so
    no process ever opens the segment half-made, even if this one dies midway.

    Call with the namespace's registry lock held exclusively. Raises
    :class:`FileExistsError` if the name is taken, :class:`StoreUnavailable` if /dev/shm
    has no room; nothing is left behind after a failure (a creator killed midway leaves
    an unfinished object, which :func:`unfinished_age` finds and gc removes).
    """
    name = segment_name(namespace, conversation_id)
    record = layout.encode_metadata(metadata)
    size = layout.segment_size(len(record), capacity)
    allocated = layout.grown_allocation(layout.initial_allocation(capacity), reserve,
                                        capacity)
    try:
        memory = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=PERMISSIONS)
    except posix_ipc.ExistentialError:
        raise FileExistsError(name) from None
    except (posix_ipc.PermissionsError, OSError) as exc:
        # A read-only or foreign-owned /dev/shm: the store is down, not the request bad.
        if isinstance(exc, posix_ipc.PermissionsError) or exc.errno in (errno.EROFS,
                                                                         errno.EACCES):
            raise StoreUnavailable(f"cannot create sessions in {SHM_DIR} ({exc})") from None
        raise
    fd = memory.fd
    mapping = header = semaphore = None
    try:
        if faults.hook is not None:
            faults.hook("create.opened")
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            os.ftruncate(fd, size)  # sparse: no page yet
            reserve_pages(fd, layout.ring_offset_for(len(record)) + allocated)
            mapping = mmap.mmap(fd, size)  # ENOMEM: no address space for a huge capacity
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise _no_room(f"a session of capacity {capacity}", exc) from None
            raise
        if faults.hook is not None:
            faults.hook("create.reserved")
        try:
            try:
                semaphore = posix_ipc.Semaphore(
                    "/" + name, posix_ipc.O_CREX, mode=PERMISSIONS, initial_value=1
                )
            except posix_ipc.ExistentialError:
                # A creator died between the two calls; under the registry lock it is garbage.
                posix_ipc.unlink_semaphore("/" + name)
                semaphore = posix_ipc.Semaphore(
                    "/" + name, posix_ipc.O_CREX, mode=PERMISSIONS, initial_value=1
                )
        except OSError as exc:
            # The semaphore is a small file in /dev/shm too: the ring may have taken the
            # last free page (posix_ipc raises a plain OSError with ENOSPC then).
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise _no_room("a session's semaphore", exc) from None
            raise
        if faults.hook is not None:
            faults.hook("create.semaphore")
        header = layout.Header(mapping)
        header.initialise(
            capacity=capacity, allocated=allocated, metadata_record=record,
            started_at_us=started_at_us, producer_pid=producer_pid,
            producer_start=producer_start, producer_scope=producer_scope, ready=False,
        )
        if fill is not None:
            fill(header)
        if faults.hook is not None:
            faults.hook("create.filled")
        header.mark_ready()
        try:
            add_to_index(namespace, name)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise _no_room("a session's index entry", exc) from None
            raise
        inode = os.fstat(fd).st_ino
    except BaseException:
        # Views first: a mapping with live exports raises BufferError on close, which
        # would hide the real error and leave both names behind.
        if header is not None:
            header.release()
        if mapping is not None:
            mapping.close()
        if semaphore is not None:
            semaphore.close()
        memory.close_fd()
        remove_from_index(namespace, name)
        unlink(name)
        raise
    return Segment._attach(name, mapping, semaphore, header, recovery_lock_path(namespace),
                           inode, fd)


def open_segment(namespace: str, name: str) -> Segment | None:
    """Map an existing segment by name; None if it is gone.

    Raises :class:`layout.CorruptSegment` for a foreign, unfinished or lying header.
    Call with the namespace's registry lock held (shared is enough).
    """
    try:
        memory = posix_ipc.SharedMemory("/" + name)  # never pass size: it would truncate
    except posix_ipc.ExistentialError:
        return None
    try:
        stat = os.fstat(memory.fd)
        if stat.st_size < layout.HEADER_SIZE:
            raise layout.CorruptSegment(
                f"segment of {stat.st_size} bytes is smaller than the header", unfinished=True)
        # Held for as long as the mapping exists: it tells retire() the segment is in use.
        fcntl.flock(memory.fd, fcntl.LOCK_SH)
        mapping = mmap.mmap(memory.fd, stat.st_size)
    finally:
        memory.close_fd()
    header = layout.Header(mapping)
    try:
        header.validate()
        semaphore = posix_ipc.Semaphore("/" + name)
    except BaseException as exc:
        header.release()
        mapping.close()
        if isinstance(exc, posix_ipc.ExistentialError):
            raise layout.CorruptSegment("segment has no semaphore", unfinished=True) from None
        raise
    return Segment._attach(name, mapping, semaphore, header, recovery_lock_path(namespace),
                           stat.st_ino)


def purge(namespace: str) -> int:
    """Remove every segment (retired ones too), semaphore and the index of ``namespace``.
    Registry lock held exclusively. Returns how many objects went."""
    removed = 0
    for name in list_names(namespace):
        unlink(name)
        removed += 1
    for name in list_orphan_semaphores(namespace):
        unlink(name)
        removed += 1
    for name in list_retired(namespace):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
    remove_index(namespace)
    return removed
