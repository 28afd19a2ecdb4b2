"""Session names, listings and the lookup index: where a session lives in ``/dev/shm``.

Names never contain the conversation id: they are ``<namespace>.<base hash><id hash>``,
where the base hash covers the id up to its first ``::``, so every ``X::model`` session of
``X`` shares a prefix. The lookup index, ``/dev/shm/<namespace>.index/<base hash>/<id
hash>`` (empty files), lists the sessions under one prefix, so a lookup reads one tiny
directory instead of listing ``/dev/shm`` (16 ms with 10,000 sessions). Entries are added
after the segment and removed before it, under the registry lock, so an entry without a
segment never outlives a crash; a segment without an entry (a creator killed between the
two) is re-indexed by gc.
"""

from __future__ import annotations

import contextlib
import os
import re

from shmstream.store import ids
from shmstream.store.ids import base_id, encode_id

SHM_DIR = "/dev/shm"  # where Linux's shm_open keeps objects; semaphores are "sem.<name>"
_BASE_HASH_HEX = 16
_ID_HASH_HEX = 32
PERMISSIONS = 0o600


def lookup_prefixes(namespace: str, conversation_id: str) -> set[str]:
    """The file-name prefixes under which ``conversation_id`` and every ``<id>::...``
    session live. Usually one; two when the id ends in ``:`` and has no ``::`` of its
    own, since then ``<id>::model`` splits one byte earlier (``a:`` -> ``a:::m``, base
    ``a``)."""
    return {base_prefix(namespace, base) for base in ids.lookup_bases(encode_id(conversation_id))}


def base_prefix(namespace: str, base: bytes) -> str:
    """The file-name prefix shared by every session whose id has this base."""
    return f"{namespace}.{ids.digest(base, _BASE_HASH_HEX)}"


def segment_name(namespace: str, conversation_id: str) -> str:
    """The shm/semaphore name (without the leading slash) of a conversation's session."""
    raw = encode_id(conversation_id)
    return f"{base_prefix(namespace, base_id(raw))}{ids.digest(raw, _ID_HASH_HEX)}"


def prefix_of(name: str) -> str:
    """The :func:`lookup_prefixes` part of a segment name."""
    return name[: len(name) - _ID_HASH_HEX]


def name_pattern(namespace: str) -> re.Pattern:
    return re.compile(re.escape(namespace) + rf"\.[0-9a-f]{{{_BASE_HASH_HEX + _ID_HASH_HEX}}}")


def retired_pattern(namespace: str) -> re.Pattern:
    return re.compile(re.escape(namespace)
                      + rf"\.r[0-9a-f]{{{_BASE_HASH_HEX + _ID_HASH_HEX}}}\.[0-9a-f]{{12}}")


def shm_entries() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []


def list_names(namespace: str, prefix: str | None = None) -> list[str]:
    """Names of every session segment of ``namespace`` (optionally under ``prefix``), by
    listing /dev/shm: for list, gc and quotas; lookups use :func:`indexed_names`."""
    return sorted(list_name_inodes(namespace, prefix))


def list_name_inodes(namespace: str, prefix: str | None = None) -> dict[str, int]:
    """:func:`list_names` with each object's inode (from the directory listing itself: no
    stat), which tells a name's current segment from a replaced one."""
    pattern = name_pattern(namespace)
    start = prefix or namespace + "."
    try:
        with os.scandir(SHM_DIR) as entries:
            return {e.name: e.inode() for e in entries
                    if e.name.startswith(start) and pattern.fullmatch(e.name)}
    except FileNotFoundError:
        return {}


def directory_mtime_ns() -> int | None:
    """/dev/shm's modification time: it changes whenever a name is added, removed or
    renamed there (any namespace's), so an unchanged one means an unchanged listing, as
    long as it was already older than the timestamps' granularity when it was read (see
    the supervisor's Reaper). None if there is no /dev/shm."""
    try:
        return os.stat(SHM_DIR).st_mtime_ns
    except FileNotFoundError:
        return None


def list_retired(namespace: str) -> list[str]:
    """Names of replaced or removed segments that were still mapped when they went."""
    pattern = retired_pattern(namespace)
    start = namespace + ".r"
    return sorted(e for e in shm_entries() if e.startswith(start) and pattern.fullmatch(e))


# --- the lookup index ----------------------------------------------------------------------


def index_dir(namespace: str) -> str:
    return os.path.join(SHM_DIR, f"{namespace}.index")


def _index_entry(namespace: str, name: str) -> str:
    prefix = prefix_of(name)
    return os.path.join(index_dir(namespace), prefix[len(namespace) + 1 :],
                        name[len(prefix) :])


def indexed_names(namespace: str, prefix: str) -> list[str]:
    """Segment names indexed under a :func:`lookup_prefixes` prefix (a few at most)."""
    folder = os.path.join(index_dir(namespace), prefix[len(namespace) + 1 :])
    try:
        return [prefix + entry for entry in os.listdir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def add_to_index(namespace: str, name: str) -> None:
    """Index ``name`` (idempotent). Registry lock held exclusively."""
    entry = _index_entry(namespace, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(entry, flags, PERMISSIONS)
    except FileExistsError:
        return  # indexed already (gc re-indexing): counted already
    except FileNotFoundError:  # the first session of its base: the folder first
        os.makedirs(os.path.dirname(entry), mode=0o700, exist_ok=True)
        fd = os.open(entry, flags, PERMISSIONS)
    os.close(fd)
    _add_to_count(namespace, 1)


def is_indexed(namespace: str, name: str) -> bool:
    return os.path.exists(_index_entry(namespace, name))


def remove_from_index(namespace: str, name: str) -> None:
    """Drop ``name``'s entry and its folder once empty. Registry lock held exclusively."""
    entry = _index_entry(namespace, name)
    try:
        os.unlink(entry)
    except FileNotFoundError:
        return
    _add_to_count(namespace, -1)
    with contextlib.suppress(OSError):  # not empty: another session of this prefix
        os.rmdir(os.path.dirname(entry))


# The number of index entries, kept beside them (``<namespace>.index/count``, a u64), so a
# session quota is checked without listing /dev/shm on every creation: that listing made
# a creation cost 6 ms with 5,000 sessions, under the exclusive registry lock. Changed
# with the entries, under the same lock; a creator killed between the two leaves it one
# off, which the session quota's recount at its limit and every gc pass set right.


def _count_path(namespace: str) -> str:
    return os.path.join(index_dir(namespace), "count")


def indexed_count(namespace: str) -> int:
    """How many sessions the index holds, as counted (see above)."""
    try:
        fd = os.open(_count_path(namespace), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        return _decode_count(os.pread(fd, 8, 0))
    finally:
        os.close(fd)


def set_indexed_count(namespace: str, count: int) -> None:
    """Set the count from a listing (gc, a quota at its limit). Registry lock held
    exclusively."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(_count_path(namespace), flags, PERMISSIONS)
    except FileNotFoundError:
        if count <= 0:
            return  # no index, nothing to count: leave /dev/shm as it is
        os.makedirs(index_dir(namespace), mode=0o700, exist_ok=True)
        fd = os.open(_count_path(namespace), flags, PERMISSIONS)
    try:
        os.pwrite(fd, max(0, count).to_bytes(8, "little"), 0)
    finally:
        os.close(fd)


def _add_to_count(namespace: str, delta: int) -> None:
    fd = os.open(_count_path(namespace), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PERMISSIONS)
    try:
        count = _decode_count(os.pread(fd, 8, 0))
        os.pwrite(fd, max(0, count + delta).to_bytes(8, "little"), 0)
    finally:
        os.close(fd)


def _decode_count(data: bytes) -> int:
    return int.from_bytes(data, "little") if len(data) == 8 else 0


def remove_index(namespace: str) -> None:
    """The whole index of ``namespace`` (purge)."""
    import shutil

    shutil.rmtree(index_dir(namespace), ignore_errors=True)
