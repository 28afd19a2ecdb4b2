"""What ``shmstream serve`` and the gunicorn master check before anything serves.

In order: the namespace is not in use by another live service (:mod:`namespace_lock`, held
from here to the master's exit), and the session store answers. Each failure is a
:class:`StartupError` whose message is one line for the operator; the service refuses to
start instead of saying "ready" and answering 500 (a store that goes down *later* is
answered with 503 while it is down, and the service recovers by itself).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket

from shmstream.backends import open_store
from shmstream.config import SettingError, Settings, redact_url
from shmstream.serve import namespace_lock

# No HTTP client can create this id (control characters are rejected): a guaranteed miss.
PROBE_ID = "\x00shmstream-start-probe"


class StartupError(RuntimeError):
    """The service cannot start; the message says why in one line."""


def prepare(settings: Settings) -> namespace_lock.NamespaceLock:
    """Hold the namespace for this process, then check the store. Raises StartupError."""
    try:
        lock = namespace_lock.hold_for_process(settings.namespace)
    except namespace_lock.NamespaceInUse as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        path = namespace_lock.lock_path(settings.namespace)
        raise StartupError(f"cannot create {path} ({exc.strerror or exc}): shared memory "
                           f"must be writable by this user") from None
    check_store(settings)
    return lock


def prepare_master() -> None:
    """``on_starting`` of the gunicorn master: :func:`prepare` with the settings from the
    environment. Raises RuntimeError (gunicorn prints it as one line and exits 1)."""
    try:
        settings = Settings.from_env()
    except SettingError as exc:
        raise StartupError(str(exc)) from None
    prepare(settings)


def check_store(settings: Settings) -> None:
    """One lookup through the configured store. Raises StartupError naming the backend."""
    backend = redact_url(settings.backend)
    try:
        store = open_store(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    try:
        with _store_logs_silenced():
            store.lookup([PROBE_ID])
    except Exception as exc:  # any backend, any failure: the operator gets one line
        detail = getattr(exc, "message", None) or str(exc) or exc.__class__.__name__
        raise StartupError(f"the session store ({backend}) does not answer: {detail}") from None
    finally:
        store.close()


@contextlib.contextmanager
def _store_logs_silenced():
    """No log records while the probe runs: a backend that logs its own outage (Redis, once
    per process) would print a second line before the refusal that says the same thing.
    Process-wide, which is harmless here: nothing else runs yet while the service starts."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def check_bind(address: str) -> None:
    """Refuse an address another program listens on, with a hint (gunicorn would retry
    for seconds and say only "Connection in use"). Raises StartupError."""
    if address.startswith("unix:"):
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return  # gunicorn reports an unresolvable address itself
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"{address} is already in use by another program; choose a free address "
                    f"with --bind HOST:PORT (or SHMSTREAM_BIND)") from None
            if exc.errno == errno.EACCES:
                raise StartupError(
                    f"no permission to listen on {address} (ports below 1024 need root); "
                    f"choose another with --bind HOST:PORT") from None
