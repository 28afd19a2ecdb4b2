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

from shmstream.store.errors import StoreUnavailable
from shmstream.store.procs import process_alive, process_start_time  # noqa: F401

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
# A lock held this long is stuck (see RobustLock's known gap): callers give up instead of
# hanging, and gc removes the segment.
STUCK_LOCK_TIMEOUT = 10.0


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


class RobustLock:
    """A named POSIX semaphore used as a mutex, recoverable from a holder killed inside it.

    The holder's pid is stored in the segment header right after acquiring and cleared to
    0 right before releasing. An acquirer that waits longer than ``check_interval`` looks
    at that pid; if it names a dead process, the waiter takes over the dead holder's hold,
    under a flock so only one waiter can do so, and without posting the semaphore, so
    there are never two holders. A 0 means "a live holder between its semaphore call and
    its pid store" and is never recovered from: a stale pid of an earlier holder (which
    may have exited since) must never be mistaken for the current one, even when a live
    holder thread is descheduled for a long time between the two steps.

    Known gap: a holder killed in that instant between ``sem_wait`` and its pid store
    leaves the lock held with owner 0 for good (a window of two bytecodes).
    """

    __slots__ = ("_semaphore", "_owner", "_owner_index", "_guard_path", "check_interval")

    def __init__(self, semaphore: posix_ipc.Semaphore, owner_view, owner_index: int,
                 guard_path: str, check_interval: float = 0.1):
        self._semaphore = semaphore
        self._owner = owner_view
        self._owner_index = owner_index
        self._guard_path = guard_path
        self.check_interval = check_interval

    def acquire(self, timeout: float | None = STUCK_LOCK_TIMEOUT) -> None:
        """Block until held. Raises :class:`LockTimeout` after ``timeout`` seconds."""
        try:
            self._semaphore.acquire(self.check_interval)
        except posix_ipc.BusyError:
            self.acquire_contended(timeout)
        self._owner[self._owner_index] = CurrentPid.value

    def acquire_contended(self, timeout: float | None = STUCK_LOCK_TIMEOUT) -> None:
        """The slow path, after one ``check_interval`` wait failed: recover from a dead
        holder or keep waiting. The caller records itself as owner afterwards."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.recover_from_dead_owner():
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
        return self._owner[self._owner_index]

    def recover_from_dead_owner(self) -> bool:
        """Take the lock if it is held by a dead process; True if the caller now holds it."""
        owner = self._owner[self._owner_index]
        if owner == 0 or process_alive(owner):
            return False
        with flocked(self._guard_path):
            try:
                self._semaphore.acquire(0)  # freed while we queued for the guard
                return True
            except posix_ipc.BusyError:
                pass
            if self._owner[self._owner_index] != owner:
                return False  # another waiter recovered it first
            self._owner[self._owner_index] = CurrentPid.value
            return True

    def release_if_dead_owner(self) -> bool:
        """For supervisors: free a lock whose holder died. True if one was freed.

        A busy lock gets ``check_interval`` to free up first, as in :meth:`acquire`: a live
        process that has just taken the semaphore stores its pid a moment later, and until
        then the field still names the previous holder, who may be dead.
        """
        try:
            self._semaphore.acquire(self.check_interval)
        except posix_ipc.BusyError:
            if not self.recover_from_dead_owner():
                return False
            self.release()
            return True
        self._semaphore.release()  # never ours to record: we held it for no time
        return False

    def release(self) -> None:
        self._owner[self._owner_index] = 0
        self._semaphore.release()

    def __enter__(self) -> RobustLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class CurrentPid:
    """This process's pid as a class attribute (one attribute load on the hot path),
    refreshed after fork: gunicorn forks workers from the master."""

    value = os.getpid()


os.register_at_fork(after_in_child=lambda: setattr(CurrentPid, "value", os.getpid()))
