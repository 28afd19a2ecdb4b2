"""Cross-process synchronisation: a semaphore lock that survives its holder's death, and a
futex doorbell that wakes every waiting reader with one syscall.

The OS calls are kept small and each errno is handled on purpose; retries and timeouts live
one level up, in :class:`RobustLock` and the session reader loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import time
from collections.abc import Callable, Iterator

import posix_ipc

from shmstream.shm import layout
from shmstream.store import faults
from shmstream.store.errors import StoreUnavailable
from shmstream.store.procs import (  # noqa: F401 - re-exported for the shm modules
    Identity,
    Liveness,
    liveness,
    process_alive,
    process_start_time,
)

# --- futex doorbell -----------------------------------------------------------------------

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_INT_MAX = 0x7FFFFFFF
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98, "i686": 240, "i386": 240}


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_futex() -> Callable | None:
    number = _SYS_FUTEX.get(platform.machine().lower())
    if number is None or os.environ.get("SHMSTREAM_NO_FUTEX"):
        return None
    syscall = ctypes.CDLL(None, use_errno=True).syscall  # ctypes drops the GIL during calls
    syscall.restype = ctypes.c_long
    probe = ctypes.c_uint32(0)
    if syscall(number, ctypes.byref(probe), _FUTEX_WAKE, 1, None, None, 0) < 0:
        return None  # ENOSYS (seccomp, exotic kernel): use polling
    return lambda *args: syscall(number, *args)


_futex = _load_futex()
FUTEX_AVAILABLE = _futex is not None


class Doorbell:
    """A 32-bit word in shared memory that producers bump and readers sleep on.

    Protocol that loses no wake-up: a reader reads the word *before* checking for data and
    sleeps only while the word still holds that value; a writer publishes data first, then
    bumps the word, then rings. The kernel compares the word atomically with going to sleep.
    """

    def __init__(self, mapping, offset: int):
        self._word = ctypes.c_uint32.from_buffer(mapping, offset)
        self._address = ctypes.c_void_p(ctypes.addressof(self._word))

    def wait(self, expected: int, timeout: float) -> None:
        """Sleep until the word differs from ``expected``, a ring, or ``timeout`` seconds."""
        if _futex is None:
            self._poll(expected, timeout)
            return
        seconds = int(timeout)
        spec = _Timespec(seconds, int((timeout - seconds) * 1e9))
        if _futex(self._address, _FUTEX_WAIT, expected, ctypes.byref(spec), None, 0) < 0:
            code = ctypes.get_errno()
            # EAGAIN: the word moved before we slept (data is there); ETIMEDOUT: periodic
            # wake; EINTR: a signal (gunicorn sends several). All mean "go and re-check".
            if code not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise OSError(code, os.strerror(code))

    def _poll(self, expected: int, timeout: float) -> None:
        # Bounded polling for kernels without futex: start fast, back off to 10 ms.
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while self._word.value == expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.01)

    def ring(self) -> None:
        """Wake every process sleeping on the word (the caller bumped it already)."""
        if _futex is not None:
            _futex(self._address, _FUTEX_WAKE, _INT_MAX, None, None, 0)

    def close(self) -> None:
        # The ctypes object pins the mmap export; drop it so the mapping can be closed.
        self._word = None


# --- a lock that survives its holder ------------------------------------------------------


class LockTimeout(Exception):
    """The lock stayed held by a live process for longer than the caller allowed."""


# Holders keep a segment lock for microseconds (a 4 MiB copy takes about a millisecond).
# A lock held this long is stuck (a live holder that hangs, or one of another pid namespace
# that died): callers give up instead of hanging, and gc removes the segment.
STUCK_LOCK_TIMEOUT = 10.0
# How long the semaphore must stay held with no owner recorded, through one single hold,
# before a waiter concludes that its holder died in the two-bytecode gap between its
# semaphore call and its record (or between clearing the record and posting). A live
# holder crosses that gap in microseconds; this is 5 orders of magnitude more, and keeps a
# dead holder's lock recovered within a second.
UNRECORDED_HOLD_GRACE = 0.5


@contextlib.contextmanager
def flocked(path: str, shared: bool = False) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (created 0600 if missing). The kernel drops it if we die.

    A fresh open per call: flock belongs to the open file description, so threads sharing
    one descriptor would not exclude each other.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # A read-only or foreign-owned /dev/shm: the store is down (503), not a crash (500).
        if exc.errno in (errno.EROFS, errno.EACCES):
            raise StoreUnavailable(f"cannot open {path} ({exc.strerror})") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class OwnerStamp:
    """What this process records as a lock holder, refreshed after fork (after
    :class:`Identity`, whose fork hook was registered first): ``record`` is (its scope,
    its ``lock_owner`` word), one attribute load on the append path (a class attribute
    load is not cheap; three of them were ~10% of it)."""

    record = (0, 0)

    @classmethod
    def refresh(cls) -> None:
        cls.record = (Identity.scope, layout.owner_word(Identity.pid, Identity.start))


OwnerStamp.refresh()
os.register_at_fork(after_in_child=OwnerStamp.refresh)


class RobustLock:
    """A named POSIX semaphore used as a mutex, recoverable from a holder killed anywhere.

    The holder records itself in the segment header right after ``sem_wait`` returns: its
    scope, then its owner word (pid and start time, :func:`layout.owner_word`), which
    completes the record in one store; it clears the word right before ``sem_post``. So
    while the semaphore is held the word is either the holder (complete record) or 0 (a
    holder inside one of the two unrecorded gaps). Every hold moves a *hold key*: an
    append bumps the doorbell word, which it does anyway, and :meth:`record` bumps the
    ``holds`` counter (an append inlines the record and skips that). A waiter that finds
    the lock busy for longer than ``check_interval``:

    - owner set, same scope, dead: the recorded process is the holder, and it died; take
      over.
    - owner set, another scope (:class:`Liveness.UNKNOWN`): never take over.
    - owner 0: take over only after the same hold (same hold key) stayed unrecorded for
      :data:`UNRECORDED_HOLD_GRACE`; a holder killed in a gap is recovered that way.

    A takeover happens under a flock so only one waiter does it, and without posting the
    semaphore, so there are never two holders; the new holder records itself as usual.
    Every crash point (before the record, inside it, while held, after clearing it, and
    inside a takeover) leaves a state one of these rules recovers.
    """

    __slots__ = ("_semaphore", "_q", "_i", "_owner_q", "_scope_q", "_holds_q", "_futex_i",
                 "_guard_path", "check_interval")

    def __init__(self, semaphore: posix_ipc.Semaphore, header_q, header_i,
                 fields: tuple[int, int, int], futex_i: int, guard_path: str,
                 check_interval: float = 0.1):
        """``fields``: the indexes in ``header_q`` of the owner word, its scope and the
        holds counter; ``futex_i``: the doorbell word's index in ``header_i``."""
        self._semaphore = semaphore
        self._q = header_q
        self._i = header_i
        self._owner_q, self._scope_q, self._holds_q = fields
        self._futex_i = futex_i
        self._guard_path = guard_path
        self.check_interval = check_interval

    def acquire(self, timeout: float | None = STUCK_LOCK_TIMEOUT) -> None:
        """Block until held. Raises :class:`LockTimeout` after ``timeout`` seconds."""
        try:
            self._semaphore.acquire(self.check_interval)
        except posix_ipc.BusyError:
            self.acquire_contended(timeout)
        if faults.hook is not None:
            faults.hook("lock.acquired-unrecorded")
        self.record()

    def record(self) -> None:
        """Record this process as the holder (call right after taking the semaphore)."""
        q = self._q
        scope, owner = OwnerStamp.record
        q[self._holds_q] += 1  # a u64 bumped once per hold never wraps
        q[self._scope_q] = scope
        if faults.hook is not None:
            faults.hook("lock.record-partial")
        q[self._owner_q] = owner  # last: the record is complete

    def acquire_contended(self, timeout: float | None = STUCK_LOCK_TIMEOUT) -> None:
        """The slow path, after one ``check_interval`` wait failed: recover from a dead
        holder or keep waiting. The caller records itself as owner afterwards."""
        deadline = None if timeout is None else time.monotonic() + timeout
        unrecorded_since: tuple[tuple[int, int], float] | None = None  # (hold key, seen)
        while True:
            holder = self.holder()
            if holder is not None:
                pid, _, _, key = holder
                if pid == 0:
                    now = time.monotonic()
                    if unrecorded_since is None or unrecorded_since[0] != key:
                        unrecorded_since = (key, now)
                    elif now - unrecorded_since[1] >= UNRECORDED_HOLD_GRACE:
                        if self._take_over(holder):
                            return
                        unrecorded_since = None
                else:
                    unrecorded_since = None
                    if self.holder_liveness(holder) is Liveness.DEAD and self._take_over(holder):
                        return
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(f"lock held by pid {self.owner_pid} for over {timeout} s")
            try:
                self._semaphore.acquire(self.check_interval)
                return
            except posix_ipc.BusyError:
                continue

    @property
    def owner_pid(self) -> int:
        return layout.owner_of(self._q[self._owner_q])[0]

    def holder(self) -> tuple[int, int, int, tuple[int, int]] | None:
        """(pid, start, scope, hold key) of the current record, or None if it changed
        while being read (a new holder is recording itself: look again later)."""
        q = self._q
        owner = q[self._owner_q]
        holds = q[self._holds_q]
        scope = q[self._scope_q]
        key = (holds, self._i[self._futex_i])
        if q[self._owner_q] != owner or q[self._holds_q] != holds:
            return None
        pid, start = layout.owner_of(owner)
        return pid, start, scope, key

    @staticmethod
    def holder_liveness(holder: tuple[int, int, int, tuple[int, int]]) -> Liveness:
        pid, start, scope, _ = holder
        return liveness(pid, start, scope)

    def _take_over(self, holder: tuple[int, int, int, tuple[int, int]]) -> bool:
        """Become the holder of a lock whose ``holder`` record names a dead process (or
        an unrecorded hold past its grace). True if the caller now holds the lock."""
        with flocked(self._guard_path):
            try:
                self._semaphore.acquire(0)  # freed while we queued for the guard
                self.record()
                return True
            except posix_ipc.BusyError:
                pass
            if self.holder() != holder:
                return False  # another waiter recovered it first, or it changed hands
            if faults.hook is not None:
                faults.hook("lock.takeover-decided")
            self.record()  # before the guard drops: a later waiter sees a live owner
            return True

    def recover_from_dead_owner(self) -> bool:
        """Take the lock if its record names a dead process; True if the caller now
        holds it (and is recorded as its owner). Never waits for the semaphore."""
        holder = self.holder()
        if holder is None or holder[0] == 0 or self.holder_liveness(holder) is not Liveness.DEAD:
            return False
        return self._take_over(holder)

    def release_if_dead_owner(self) -> bool:
        """For supervisors: free a lock whose recorded holder died. True if one was freed.

        A probe, never a hold: it reads the semaphore's value and the record, and takes
        the semaphore only to take over from the dead (recorded as owner while it holds
        it). A hold that is not recorded yet is left to the waiters' grace rule.
        """
        if self._semaphore.value != 0:
            return False
        if not self.recover_from_dead_owner():
            return False
        self.release()
        return True

    def release(self) -> None:
        self._q[self._owner_q] = 0
        if faults.hook is not None:
            faults.hook("lock.cleared-unposted")
        self._semaphore.release()

    def __enter__(self) -> RobustLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
