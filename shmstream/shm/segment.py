"""Session segments: naming, creating, opening, unlinking and mapping.

Each session is one POSIX shared-memory object plus one named semaphore of the same name.
Names never contain the conversation id: they are ``<namespace>.<base hash><id hash>``,
where the base hash covers the id up to its first ``::`` so a lookup of ``X`` finds every
``X::model`` session by listing names, without opening unrelated segments.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import posix_ipc

from shmstream.shm import layout
from shmstream.shm.sync import Doorbell, RobustLock
from shmstream.store import faults, ids
from shmstream.store.errors import StoreUnavailable
from shmstream.store.ids import (  # noqa: F401 - re-exported for the shm tools
    base_id,
    encode_id,
    short_hash,
    validate_namespace,
)

SHM_DIR = "/dev/shm"  # where Linux's shm_open keeps objects; semaphores are "sem.<name>"
_BASE_HASH_HEX = 16
_ID_HASH_HEX = 32
PERMISSIONS = 0o600
# An object without the ready marker this long after its last change is a dead creator's
# (creators finish in microseconds, under the registry lock): gc removes it.
DEBRIS_GRACE = 2.0






def lookup_prefixes(namespace: str, conversation_id: str) -> set[str]:
    """The file-name prefixes under which ``conversation_id`` and every ``<id>::...``
    session live. Usually one; two when the id ends in ``:`` and has no ``::`` of its
    own, since then ``<id>::model`` splits one byte earlier (``a:`` -> ``a:::m``, base
    ``a``)."""
    raw = encode_id(conversation_id)
    bases = {base_id(raw)}
    if raw.endswith(b":") and b"::" not in raw:
        bases.add(raw[:-1])
    return {f"{namespace}.{ids.digest(base, _BASE_HASH_HEX)}" for base in bases}


def segment_name(namespace: str, conversation_id: str) -> str:
    """The shm/semaphore name (without the leading slash) of a conversation's session."""
    raw = encode_id(conversation_id)
    base = ids.digest(base_id(raw), _BASE_HASH_HEX)
    return f"{namespace}.{base}{ids.digest(raw, _ID_HASH_HEX)}"


def prefix_of(name: str) -> str:
    """The :func:`lookup_prefixes` part of a segment name."""
    return name[: len(name) - _ID_HASH_HEX]



def list_names(namespace: str, prefix: str | None = None) -> list[str]:
    """Names of every session segment of ``namespace`` (optionally under ``prefix``)."""
    pattern = re.compile(
        re.escape(namespace) + rf"\.[0-9a-f]{{{_BASE_HASH_HEX + _ID_HASH_HEX}}}"
    )
    start = prefix or namespace + "."
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(start) and pattern.fullmatch(e))


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


def reserve_pages(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of tmpfs for ``fd`` now, so a full /dev/shm fails here with
    ENOSPC instead of SIGBUS on the first write (the OS seam tests inject failures into)."""
    os.posix_fallocate(fd, 0, size)


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


@dataclass(eq=False)
class Segment:
    """One mapped session segment with its lock and doorbell. Close it when done."""

    name: str
    mapping: mmap.mmap
    header: layout.Header
    semaphore: posix_ipc.Semaphore
    lock: RobustLock
    doorbell: Doorbell
    inode: int = 0  # tells this object from a later one of the same name
    _holders: int = 1  # handles sharing this mapping (see retain)
    _holders_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def _attach(cls, name: str, mapping: mmap.mmap, semaphore: posix_ipc.Semaphore,
                header: layout.Header, guard_path: str, inode: int) -> Segment:
        lock = RobustLock(semaphore, header.q, layout.LOCK_FIELDS_Q, guard_path)
        return cls(name, mapping, header, semaphore, lock,
                   Doorbell(mapping, layout.FUTEX_OFFSET), inode)

    def still_named(self) -> bool:
        """Whether our name still refers to this object (not unlinked, not replaced).
        Meaningful under the registry lock."""
        try:
            return os.stat(os.path.join(SHM_DIR, self.name)).st_ino == self.inode
        except FileNotFoundError:
            return False

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
        self.mapping.close()
        self.semaphore.close()


def create(namespace: str, conversation_id: str, *, capacity: int, metadata: dict,
           started_at_us: int, producer_pid: int, producer_start: int,
           producer_scope: int = 0,
           fill: Callable[[layout.Header], None] | None = None) -> Segment:
    """Create a session's segment and semaphore (mode 0600), reserved and initialised.

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
    try:
        memory = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=PERMISSIONS)
    except posix_ipc.ExistentialError:
        raise FileExistsError(name) from None
    mapping = header = semaphore = None
    try:
        if faults.hook is not None:
            faults.hook("create.opened")
        try:
            reserve_pages(memory.fd, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise StoreUnavailable(
                    f"no room in {SHM_DIR} for a {size}-byte session ({exc.strerror})"
                ) from None
            raise
        inode = os.fstat(memory.fd).st_ino
        mapping = mmap.mmap(memory.fd, size)
        if faults.hook is not None:
            faults.hook("create.reserved")
        semaphore = _create_semaphore(name)
        if faults.hook is not None:
            faults.hook("create.semaphore")
        header = layout.Header(mapping)
        header.initialise(
            capacity=capacity, metadata_record=record, started_at_us=started_at_us,
            producer_pid=producer_pid, producer_start=producer_start,
            producer_scope=producer_scope, ready=False,
        )
        if fill is not None:
            fill(header)
        if faults.hook is not None:
            faults.hook("create.filled")
        header.mark_ready()
    except BaseException:
        # Views first: a mapping with live exports raises BufferError on close, which
        # would hide the real error and leave both names behind.
        if header is not None:
            header.release()
        if mapping is not None:
            mapping.close()
        if semaphore is not None:
            semaphore.close()
        unlink(name)
        raise
    finally:
        memory.close_fd()
    return Segment._attach(name, mapping, semaphore, header, recovery_lock_path(namespace),
                           inode)


def _create_semaphore(name: str) -> posix_ipc.Semaphore:
    try:
        try:
            return posix_ipc.Semaphore(
                "/" + name, posix_ipc.O_CREX, mode=PERMISSIONS, initial_value=1
            )
        except posix_ipc.ExistentialError:
            # A creator died between the two calls; under the registry lock it is garbage.
            posix_ipc.unlink_semaphore("/" + name)
            return posix_ipc.Semaphore(
                "/" + name, posix_ipc.O_CREX, mode=PERMISSIONS, initial_value=1
            )
    except OSError as exc:
        # The semaphore is a small file in /dev/shm too: the ring may have taken the
        # last free page (posix_ipc raises a plain OSError with ENOSPC then).
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise StoreUnavailable(
                f"no room in {SHM_DIR} for a session's semaphore ({exc.strerror})"
            ) from None
        raise


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
        size = stat.st_size
        if size < layout.HEADER_SIZE:
            raise layout.CorruptSegment(f"segment of {size} bytes is smaller than the header",
                                        unfinished=True)
        mapping = mmap.mmap(memory.fd, size)
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
