"""One live service per namespace: an flock on ``/dev/shm/<namespace>.service``.

The gunicorn master holds the lock for its lifetime, taken before anything touches the
namespace (segments, the metrics directory). A second service on the same namespace is
refused with a message naming it, instead of resetting the first one's counters and
deleting its metrics directory on exit. The kernel releases an flock when its holder dies,
so a killed service never leaves a stale lock (the file itself may stay; it is reused).

``shmstream serve`` takes the lock and then execs gunicorn, which keeps the descriptor (same
process, passed in ``SHMSTREAM_NAMESPACE_LOCK_FD``); ``gunicorn -c gunicorn.conf.py`` takes
it in ``on_starting``. The file holds the holder's pid, for the message only.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os

SHM_DIR = "/dev/shm"
SUFFIX = ".service"
FD_ENV = "SHMSTREAM_NAMESPACE_LOCK_FD"
_ATTEMPTS = 5  # the file can be replaced between our open and our flock (see acquire)


class NamespaceInUse(RuntimeError):
    """Another live process holds the namespace. The message names it and the holder."""


def lock_path(namespace: str, shm_dir: str = SHM_DIR) -> str:
    return os.path.join(shm_dir, namespace + SUFFIX)


def holder_pid(namespace: str, shm_dir: str = SHM_DIR) -> int | None:
    """The pid written by the live holder, or None (no file, or nobody holds the lock)."""
    path = lock_path(namespace, shm_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class NamespaceLock:
    """The held lock of one namespace; :meth:`release` (or the process's exit) ends it."""

    def __init__(self, namespace: str, fd: int, path: str):
        self.namespace = namespace
        self.fd = fd
        self.path = path
        self.owner_pid = os.getpid()

    @classmethod
    def acquire(cls, namespace: str, shm_dir: str = SHM_DIR) -> NamespaceLock:
        """Take the namespace's lock without waiting.

        Raises :class:`NamespaceInUse` if a live process holds it, and OSError if the file
        cannot be made (a read-only or missing /dev/shm).
        """
        path = lock_path(namespace, shm_dir)
        for _ in range(_ATTEMPTS):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = holder_pid(namespace, shm_dir)
                if pid and not _alive(pid):
                    # Its master died; forked workers still hold the descriptor for a moment.
                    raise NamespaceInUse(
                        f"namespace {namespace!r} is still held by the exiting processes of a "
                        f"stopped service (pid {pid}); try again in a few seconds") from None
                by = f" (pid {pid})" if pid else ""
                raise NamespaceInUse(
                    f"namespace {namespace!r} is in use by a running shmstream service{by}; "
                    f"stop it, or give this one another namespace (--namespace or "
                    f"SHMSTREAM_NAMESPACE)") from None
            except BaseException:
                os.close(fd)
                raise
            # A releasing holder unlinks the file: if ours was unlinked between the open
            # and the flock, we hold a lock on a file nobody else will open. Start over.
            if _same_file(fd, path):
                lock = cls(namespace, fd, path)
                lock._write_pid()
                return lock
            os.close(fd)
        raise OSError(errno.EAGAIN, f"{path} keeps being replaced")

    @classmethod
    def adopt(cls, namespace: str, fd: int, shm_dir: str = SHM_DIR) -> NamespaceLock | None:
        """The lock this process already holds on descriptor ``fd`` (inherited through
        exec), or None if ``fd`` is not that namespace's lock file."""
        path = lock_path(namespace, shm_dir)
        try:
            if not _same_file(fd, path):
                return None
            # flock on a descriptor that already holds it succeeds; one that does not (a
            # foreign fd) must not wait or steal: a failure means it is not ours.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None
        lock = cls(namespace, fd, path)
        lock._write_pid()
        return lock

    def _write_pid(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def pass_through_exec(self, environ: dict) -> None:
        """Keep the descriptor across ``exec`` and name it in ``environ`` for the new
        program (gunicorn's ``on_starting`` adopts it)."""
        os.set_inheritable(self.fd, True)
        environ[FD_ENV] = str(self.fd)

    def release(self) -> None:
        """Remove the file and drop the lock. Only the process that took the lock does
        anything: forked children (gunicorn workers) inherit this object too."""
        if self.fd < 0 or os.getpid() != self.owner_pid:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                os.unlink(self.path)  # while still locked: see acquire
        os.close(self.fd)
        self.fd = -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        held, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


_held: dict[str, NamespaceLock] = {}


def hold_for_process(namespace: str, environ: dict | None = None) -> NamespaceLock:
    """The namespace's lock for this process's lifetime: adopted from ``FD_ENV`` when
    ``shmstream serve`` took it before exec, else taken now. Released at exit.

    Raises :class:`NamespaceInUse` or OSError as :meth:`NamespaceLock.acquire` does.
    """
    if namespace in _held:
        return _held[namespace]
    environ = os.environ if environ is None else environ
    lock = None
    inherited = environ.get(FD_ENV, "")
    if inherited.isdigit():
        lock = NamespaceLock.adopt(namespace, int(inherited))
    if lock is None:
        lock = NamespaceLock.acquire(namespace)
    # Inheritable, so gunicorn's re-exec on USR2 keeps it (the new master adopts it).
    lock.pass_through_exec(environ)
    _held[namespace] = lock
    atexit.register(lock.release)
    return lock
