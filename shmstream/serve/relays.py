"""Relay processes under the gunicorn master: one listening socket, N relays, renewals.

Why not gunicorn's dirty arbiters (gunicorn 25+, read in 27.0.1's ``gunicorn/dirty``): they
are a pool for *calls*, and a relay's generation must outlive its caller.
- The dirty arbiter queues each request for one worker and runs that worker's queue one
  request at a time (``_start_worker_consumer``): one long stream occupies a dirty worker,
  so thousands of concurrent streams would need thousands of processes.
- The task is tied to the caller's connection: when the HTTP worker dies, the arbiter's
  write to it fails and it drops the connection to the dirty worker, which abandons the
  generator. A kill -9 of the HTTP worker would still cut the answer.
- On SIGHUP (``DirtyArbiter.reload``) it spawns new dirty workers, then SIGTERMs
  ``list(self.workers)[dirty_workers:]``, which after the spawn are the *new* ones (the dict
  keeps insertion order), so the old code keeps running; and a dirty worker's SIGTERM only
  closes its server, running tasks are not drained. ``dirty_graceful_timeout`` applies to
  the final stop only.
- Its cost per chunk: each chunk is a serialized frame through two unix-socket hops
  (worker -> arbiter -> HTTP worker); a relay appends it to the store and nothing else.
So shmstream has its own, shaped the same way: the master owns one listening unix socket
per service (a private directory), relays inherit it and accept on it, so a renewal has no
gap (connections wait in the backlog); the master restarts a relay that dies and, on
SIGHUP, starts new relays and retires the old ones (stop accepting, finish every answer,
exit).

This module is also the relay process's entry point (``python -m shmstream.serve.relays``):
the wiring that opens the store, which :mod:`shmstream.relay` never does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shmstream.config import Settings
from shmstream.relay.handoff import SOCKET_ENV
from shmstream.relay.server import BACKLOG
from shmstream.serve.logsetup import configure_process_logging
from shmstream.store.procs import process_alive, process_start_time

log = logging.getLogger("shmstream.serve.relays")

FD_ENV = "SHMSTREAM_RELAY_FD"  # the inherited listening socket's descriptor
READY_ENV = "SHMSTREAM_RELAY_READY_FD"  # a pipe the relay writes a byte to once it accepts
READY_TIMEOUT = 15.0  # seconds a reload waits for its new relays before retiring the old
PARENT_ENV = "SHMSTREAM_RELAY_PARENT"  # the master's pid (the relay dies with it)
WATCH_INTERVAL = 0.2  # seconds: a dead relay's sessions are aborted within about this
# A child found dead waits this long before it is replaced: when a stop signal reached the
# whole group (systemd's control-group kill), the master's own handler marks the stop in
# the meantime and nothing is restarted during shutdown (issue 14, item 5).
RESTART_SETTLE = 0.5
# A relay that dies soon after it started (the store is down, a bad setting) is restarted
# after a growing delay, so the log gets one line per try instead of two per second.
QUICK_DEATH = 10.0  # seconds
MAX_BACKOFF = 30.0  # seconds


@dataclass
class RelayChild:
    process: subprocess.Popen
    start_time: int
    ready_fd: int = -1  # the read end of its readiness pipe: a byte once it accepts
    retiring: bool = False
    dead_since: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def wait_ready(self, timeout: float) -> bool:
        """Whether the relay accepts hand-offs, waiting up to ``timeout`` seconds."""
        if self.ready_fd < 0:
            return True
        readable, _, _ = select.select([self.ready_fd], [], [], timeout)
        if not readable:
            return False
        os.close(self.ready_fd)
        self.ready_fd = -1
        return True

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        if process_alive(self.pid, self.start_time):
            return True
        with contextlib.suppress(ChildProcessError, OSError):
            self.process.poll()  # reap it unless gunicorn's waitpid(-1) did
        return False

    def signal(self, sig: int) -> None:
        if process_alive(self.pid, self.start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def default_relay_count() -> int:
    """One relay per CPU, at most 4. A relay is one event loop: on 2 cores one relay was
    the bottleneck of a 2,000-stream ramp (1,000 stream setups a second at ~0.8 ms of relay
    CPU each, beside the events); two cut its first-event p99 from 1.59 s to 0.52 s and
    its longest answer from 11.5 s to 10.5 s (scripts/bench_scale.py)."""
    return max(1, min(os.cpu_count() or 1, 4))


class RelayPool:
    """The master's relays: start, watch, restart, renew on reload, stop.

    ``abort_producers(pids)`` ends the sessions of relays that died (the store's reaping,
    from the master: no waiting for the supervisor)."""

    def __init__(self, settings: Settings, abort_producers: Callable[[list[int]], int],
                 count: int | None = None, graceful_timeout: float | None = None):
        self.settings = settings
        self.count = max(1, count if count is not None else
                         settings.relays or default_relay_count())
        self.graceful_timeout = (graceful_timeout if graceful_timeout is not None
                                 else settings.graceful_timeout)
        self.abort_producers = abort_producers
        self.children: list[RelayChild] = []
        self.restarts = 0
        self.backoff = 0.0  # seconds before the next restart of a relay that died young
        self.stopping = False
        self._lock = threading.RLock()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self._directory = ""
        self.socket_path = ""
        self._listener: socket.socket | None = None
        self._exported = False

    # --- starting -------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, export ``SHMSTREAM_RELAY_SOCKET`` (HTTP workers forked later inherit it),
        start the relays and their watcher."""
        preset = os.environ.get(SOCKET_ENV)
        if preset:  # chosen by the operator (or a test): a stale socket file is replaced
            self.socket_path = preset
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(preset).st_mode):
                    os.unlink(preset)
        else:  # a private directory: only this user reaches the relays
            self._directory = tempfile.mkdtemp(prefix=f"shmstream-{self.settings.namespace}-")
            self.socket_path = os.path.join(self._directory, "relay.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(BACKLOG)
        self._listener = listener
        self._exported = not preset
        os.environ[SOCKET_ENV] = self.socket_path
        with self._lock:
            for _ in range(self.count):
                self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="shmstream-relay-watch",
                                         daemon=True)
        self._watcher.start()

    def _spawn(self) -> RelayChild:
        assert self._listener is not None
        fd = self._listener.fileno()
        ready_read, ready_write = os.pipe()
        env = {**os.environ, **self.settings.to_env(), FD_ENV: str(fd),
               READY_ENV: str(ready_write), PARENT_ENV: str(os.getpid()),
               SOCKET_ENV: self.socket_path}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "shmstream.serve.relays"], env=env,
                pass_fds=(fd, ready_write),
                # its own process group: a terminal's ^C or a killpg reaches the master,
                # which stops the relays in order, not the relays behind its back
                start_new_session=True,
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        child = RelayChild(process, process_start_time(process.pid), ready_read)
        self.children.append(child)
        log.info("started relay pid %d", process.pid)
        return child

    def active(self) -> list[RelayChild]:
        with self._lock:
            return [c for c in self.children if not c.retiring]

    def pids(self) -> list[int]:
        with self._lock:
            return [c.pid for c in self.children]

    # --- watching -------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop_watch.wait(WATCH_INTERVAL):
            try:
                self.check()
            except Exception:
                log.exception("relay watch pass failed")

    def check(self) -> None:
        """One pass: abort the sessions of relays that died, replace them (not while
        stopping), forget retired relays that exited."""
        now = time.monotonic()
        with self._lock:
            for child in list(self.children):
                if child.dead_since or child.alive():
                    continue
                child.dead_since = now
                self._reap_sessions(child)
                if not (child.retiring or self.stopping):
                    quick = now - child.started_at < QUICK_DEATH
                    self.backoff = min(max(1.0, self.backoff * 2), MAX_BACKOFF) if quick \
                        else 0.0
            for child in list(self.children):
                if not child.dead_since:
                    continue
                child.wait_ready(0)  # closes the pipe's read end if the byte came
                if child.ready_fd >= 0:
                    os.close(child.ready_fd)
                    child.ready_fd = -1
                if child.retiring or self.stopping:
                    self.children.remove(child)
                    log.info("relay pid %d exited", child.pid)
                elif now - child.dead_since >= max(RESTART_SETTLE, self.backoff):
                    self.children.remove(child)
                    self.restarts += 1
                    log.error("relay pid %d died after %.1f s; starting a new one "
                              "(restart #%d)", child.pid, child.dead_since - child.started_at,
                              self.restarts)
                    self._spawn()

    def _reap_sessions(self, child: RelayChild) -> None:
        try:
            aborted = self.abort_producers([child.pid])
        except Exception:
            log.exception("could not abort the sessions of relay pid %d", child.pid)
            return
        if aborted:
            log.warning("relay pid %d exited: aborted %d of its running session(s)",
                        child.pid, aborted)

    # --- reload and stop ------------------------------------------------------------------
    def reload(self) -> None:
        """New relays take new answers; the old ones finish theirs, then exit."""
        with self._lock:
            if self.stopping:
                return
            old = self.active()
            new = [self._spawn() for _ in range(self.count)]
            for child in old:
                child.retiring = True  # not replaced by the watcher from now on
        # Retire the old ones once the new ones accept (the master's loop waits for it, as
        # it waits for new workers), so no hand-off waits for a relay still booting.
        deadline = time.monotonic() + READY_TIMEOUT
        for child in new:
            if not child.wait_ready(max(0.0, deadline - time.monotonic())):
                log.warning("reload: relay pid %d not ready after %g s; retiring the old "
                            "ones anyway", child.pid, READY_TIMEOUT)
                break
        for child in old:
            child.signal(signal.SIGHUP)
        log.info("reload: %d new relay(s); %d old one(s) finish their answers",
                 self.count, len(old))

    def begin_stop(self, graceful: bool) -> None:
        """SIGTERM (answers finish within the graceful timeout) or SIGQUIT (abort now) to
        every relay; nothing is restarted from now on."""
        with self._lock:
            self.stopping = True
            for child in self.children:
                child.signal(signal.SIGTERM if graceful else signal.SIGQUIT)

    def stop(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` (default: the graceful timeout and a margin) for the
        relays to exit, kill what is left, abort their sessions and remove the socket.
        Calls :meth:`begin_stop` (graceful) first if nobody did."""
        if not self.stopping:
            self.begin_stop(graceful=True)
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(5)
        deadline = time.monotonic() + (self.graceful_timeout + 5 if timeout is None
                                       else timeout)
        with self._lock:
            children = list(self.children)
        while any(c.alive() for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in children:
            if child.alive():
                log.warning("relay pid %d did not exit in time; killing it", child.pid)
                child.signal(signal.SIGKILL)
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError, OSError):
                child.process.wait(1)
        with contextlib.suppress(Exception):
            aborted = self.abort_producers([c.pid for c in children])
            if aborted:
                log.warning("stop: aborted %d session(s) of the relays", aborted)
        with self._lock:
            self.children.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._exported and os.environ.get(SOCKET_ENV) == self.socket_path:
            del os.environ[SOCKET_ENV]  # a later pool in this process makes its own
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)


# --- the relay process --------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM (a graceful stop) when the master dies, Linux only."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _signal_ready(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"1")
    with contextlib.suppress(OSError):
        os.close(fd)


def main() -> int:
    """A relay process: the inherited socket, the configured store and upstream."""
    from shmstream import metrics
    from shmstream.backends import open_store
    from shmstream.relay.h1client import make_relay_upstream
    from shmstream.relay.process import RelayProcess

    configure_process_logging()
    settings = Settings.from_env()
    parent = os.environ.get(PARENT_ENV)
    sock = socket.socket(fileno=int(os.environ[FD_ENV]))
    metrics.get()  # reserve this process's metric files up front
    store = open_store(settings)
    upstream = make_relay_upstream(settings.upstream, settings.demo_tokens_per_second)
    ready = os.environ.get(READY_ENV)
    relay = RelayProcess(store, upstream, sock, settings.ping_interval,
                         settings.graceful_timeout,
                         on_ready=(lambda: _signal_ready(int(ready))) if ready else None)
    if parent:
        _die_with_parent(int(parent))  # a SIGTERM it brings is queued for the loop
    return relay.run()


if __name__ == "__main__":
    sys.exit(main())
