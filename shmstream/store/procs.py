"""Process identity: is a recorded producer or lock holder still alive?

A pid alone names a process only within one boot and one PID namespace: containers that
share ``/dev/shm`` (``--ipc=container:``) or one Redis do not share pids. So an identity is
(scope, pid, start time): the scope names this boot and PID namespace, the start time tells
a reused pid apart. A process of another scope is :attr:`Liveness.UNKNOWN`: nothing here can
prove it dead, so nothing may take over what it holds or abort what it produces.
"""

from __future__ import annotations

import enum
import hashlib
import os
import socket
from collections.abc import Collection


def machine_scope() -> str:
    """What makes a pid unambiguous: this boot of this kernel and this PID namespace
    (``<boot id>/<pid namespace inode>``), or the host name where /proc cannot tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{boot_id}/{namespace}"


def scope_id(scope: str | None = None) -> int:
    """:func:`machine_scope` (or ``scope``) as a non-zero u64, for binary headers.

    0 is never returned: a zero field means "no identity recorded".
    """
    text = machine_scope() if scope is None else scope
    digest = hashlib.blake2b(text.encode(), digest_size=8, person=b"shmstream-sc").digest()
    return int.from_bytes(digest, "little") or 1


def _stat_fields(path: str) -> list[bytes]:
    with open(path, "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()


def process_start_time(pid: int) -> int:
    """The kernel's start time of ``pid`` (clock ticks since boot), or 0 if unknown/gone."""
    try:
        fields = _stat_fields(f"/proc/{pid}/stat")
    except (OSError, IndexError):
        return 0
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3


def own_start_time() -> int:
    """This process's start time, read through ``/proc/self``: right even when ``/proc``
    belongs to another pid namespace than ours (where ``/proc/<getpid()>`` is someone else)."""
    try:
        return int(_stat_fields("/proc/self/stat")[19])
    except (OSError, IndexError):
        return 0


def process_alive(pid: int, start_time: int = 0) -> bool:
    """Whether ``pid`` (of this scope) runs and, when ``start_time`` is given, is the same
    process.

    A zombie (killed, not yet reaped by its parent) counts as dead: it will never release
    anything it held.
    """
    if pid <= 0:
        return False
    try:
        fields = _stat_fields(f"/proc/{pid}/stat")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no /proc: fall back to signal 0, which cannot see zombies or reuse
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] in (b"Z", b"X"):
        return False
    return not (start_time and int(fields[19]) != start_time)


class Liveness(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"  # another boot or pid namespace: presume alive, never take over


def producer_doomed(liveness: Liveness, pid: int, targets: Collection[int] | None) -> bool:
    """The ``abort_producers`` rule of every backend: with no ``targets``, a running
    session's producer is aborted when its process is dead (or a newer process reuses its
    pid); otherwise when it is one of ``targets``. A producer of another boot or pid
    namespace (``UNKNOWN``) is never aborted: nothing here can prove it dead."""
    if liveness is Liveness.UNKNOWN:
        return False
    if targets is None:
        return liveness is Liveness.DEAD
    return pid in targets


class Identity:
    """This process's identity as class attributes (one attribute load on hot paths),
    refreshed after fork: gunicorn forks workers from the master, and a child forked
    after ``unshare(CLONE_NEWPID)`` lives in another pid namespace than its parent."""

    pid = 0
    start = 0
    scope = 0

    @classmethod
    def refresh(cls) -> None:
        cls.pid = os.getpid()
        cls.start = own_start_time()
        cls.scope = scope_id()


Identity.refresh()
os.register_at_fork(after_in_child=Identity.refresh)


def liveness(pid: int, start_time: int, scope: int) -> Liveness:
    """Whether the process recorded as (``scope``, ``pid``, ``start_time``) still runs.

    A pid of 0 names no process (DEAD). A scope other than ours, including 0 (not
    recorded), is UNKNOWN: its pid means nothing in our ``/proc``.
    """
    if pid <= 0:
        return Liveness.DEAD
    if scope != Identity.scope:
        return Liveness.UNKNOWN
    return Liveness.ALIVE if process_alive(pid, start_time) else Liveness.DEAD
