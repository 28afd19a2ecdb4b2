"""Process identity on this host: is a recorded producer or lock holder still alive?"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection


def process_start_time(pid: int) -> int:
    """The kernel's start time of ``pid`` (clock ticks since boot), or 0 if unknown/gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3


def process_alive(pid: int, start_time: int = 0) -> bool:
    """Whether ``pid`` runs and, when ``start_time`` is given, is the same process.

    A zombie (killed, not yet reaped by its parent) counts as dead: it will never release
    anything it held.
    """
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
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


def producer_doomed(pid: int, start_time: int, targets: Collection[int] | None) -> bool:
    """The ``abort_producers`` rule: with no ``targets``, a producer is aborted when its
    process is dead (or a newer process reuses its pid); otherwise when it is one of them."""
    if targets is None:
        return not process_alive(pid, start_time)
    return pid in targets
