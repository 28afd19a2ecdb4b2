"""The supervisor: garbage collection and dead-producer reaping for one namespace.

Shaped like gunicorn's arbiter: signal handlers only enqueue, ``handle_<signal>`` methods do
the work in one main loop with a bounded wait, followed by ``reap`` (dead producers, every
``REAP_INTERVAL``) and ``collect`` (TTL expiry, every ``gc_interval``) passes.

It runs standalone (``shmstream supervise``) or as a child of the gunicorn master, which
starts it in ``when_ready``, restarts it if it dies (:class:`SupervisorProcess`) and stops
it at exit. As a child it asks the kernel to kill it when the master dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from shmstream import metrics
from shmstream.backends import open_store
from shmstream.config import Settings
from shmstream.store.errors import StoreUnavailable
from shmstream.store.interface import SessionStore

log = logging.getLogger("shmstream.serve.supervisor")

REAP_INTERVAL = 0.5  # seconds: a dead producer's readers end within about this
PARENT_ENV = "SHMSTREAM_SUPERVISOR_PARENT"  # set when the gunicorn master is the parent
_PR_SET_PDEATHSIG = 1


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self, store: SessionStore, gc_interval: float,
                 reap_interval: float = REAP_INTERVAL):
        self.store = store
        self.gc_interval = gc_interval
        self.reap_interval = reap_interval
        self.signal_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.alive = True
        self.next_gc = 0.0  # collect at once on start: leftovers of a previous run
        self.failing: float | None = None  # monotonic time the current outage started
        self.reported_failure = False  # whether this supervisor logged that outage itself

    # --- signals: enqueue only ---------------------------------------------------------
    def init_signals(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self.signal)

    def signal(self, sig, frame) -> None:
        self.signal_queue.put_nowait(sig)

    def handle_term(self) -> None:
        self.alive = False

    handle_int = handle_quit = handle_term

    def handle_hup(self) -> None:
        log.info("SIGHUP: collecting now")
        self.next_gc = 0.0

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        self.init_signals()
        log.info("supervisor running (pid %d) for %r: gc every %.0f s, reap every %.1f s",
                 os.getpid(), self.store, self.gc_interval, self.reap_interval)
        while self.alive:
            self.run_once()
            self.wait(self.reap_interval)
        log.info("supervisor stopping")

    def run_once(self) -> None:
        """One reap pass, and a GC pass when it is due. Errors are never fatal, and logged
        once per change (down, back), not on every pass of an outage."""
        try:
            self.reap()
            if time.monotonic() >= self.next_gc:
                self.collect()
                self.next_gc = time.monotonic() + self.gc_interval
        except Exception as exc:
            if self.failing is None:
                self.failing = time.monotonic()
                # A store that logs its own outages (``logged``: the Redis backend, once
                # per process) has said it: a second line would say the same thing.
                self.reported_failure = not getattr(exc, "logged", False)
                if self.reported_failure:
                    detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                    # A known outage is one line; anything else shows its traceback, once.
                    log.error("store unavailable: %s; retrying every %.1f s", detail,
                              self.reap_interval,
                              exc_info=not isinstance(exc, StoreUnavailable))
            return
        if self.failing is not None:
            if self.reported_failure:
                log.warning("store available again after %.1f s",
                            time.monotonic() - self.failing)
            self.failing = None

    def wait(self, timeout: float) -> None:
        try:
            sig = self.signal_queue.get(timeout=timeout)
        except queue.Empty:
            return
        name = signal.Signals(sig).name[3:].lower()
        getattr(self, f"handle_{name}")()

    def reap(self) -> int:
        aborted = self.store.abort_producers(repeated=True)
        if aborted:
            log.warning("reaped %d session(s) whose producer died", aborted)
            metrics.producers_reaped(aborted, "supervisor")
        return aborted

    def collect(self):
        report = self.store.gc()
        if report.expired or report.aborted or report.corrupt_removed or report.locks_recovered:
            log.info("gc: %s", report)
            metrics.gc_report(report)
        return report


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the gunicorn master dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(0)


def supervise(args) -> int:
    """``shmstream supervise``: run the supervisor in the foreground."""
    settings = Settings.from_env()
    if args.namespace:
        settings = dataclasses.replace(settings, namespace=args.namespace)
    parent = os.environ.get(PARENT_ENV)
    if parent:
        _die_with_parent(int(parent))
    metrics.get()  # reserve this process's metric files up front
    supervisor = Supervisor(open_store(settings), settings.gc_interval)
    if args.once:
        reaped = supervisor.reap()
        report = supervisor.collect()
        print(f"namespace {settings.namespace}: reaped {reaped} session(s) whose producer died; "
              f"gc expired {report.expired}, aborted {report.aborted}, recovered "
              f"{report.locks_recovered} lock(s), removed {report.corrupt_removed} broken "
              f"object(s), kept {report.kept}")
        return 0
    supervisor.run()
    return 0


class SupervisorProcess:
    """The gunicorn master's handle on its supervisor child: start, watch, restart, stop.

    gunicorn's arbiter reaps *every* child with ``waitpid(-1)``, so the watcher cannot rely
    on ``Popen.wait()``; it checks liveness by pid and start time instead.
    """

    WATCH_INTERVAL = 0.5
    RESTART_SETTLE = 0.5  # seconds a dead supervisor waits for a stop before it is replaced

    def __init__(self, settings: Settings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.start_time = 0
        self.restarts = 0
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="shmstream-supervisor-watch",
                                         daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        from shmstream.shm.sync import process_start_time

        env = {**os.environ, **self.settings.to_env(), PARENT_ENV: str(os.getpid())}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shmstream.cli.main", "supervise"], env=env, close_fds=True,
            # its own process group: a terminal's ^C reaches the master, which stops the
            # supervisor last, instead of killing it first (and seeing it "die")
            start_new_session=True,
        )
        self.start_time = process_start_time(self.process.pid)
        log.info("started supervisor pid %d", self.process.pid)

    def alive(self) -> bool:
        from shmstream.shm.sync import process_alive

        return self.process is not None and process_alive(self.process.pid, self.start_time)

    def _watch(self) -> None:
        while not self._stopping.wait(self.WATCH_INTERVAL):
            if self.alive():
                continue
            # A stop signal sent to the whole group (systemd's control-group kill) reaches
            # the supervisor and the master together: give the master's handler the time
            # to mark the stop before calling this a death (issue 14, item 5).
            if self._stopping.wait(self.RESTART_SETTLE):
                log.info("supervisor pid %d exited during shutdown", self.process.pid)
                return
            self.restarts += 1
            log.error("supervisor died; restarting it (restart #%d)", self.restarts)
            self._spawn()

    def begin_stop(self) -> None:
        """A stop began: never restart the supervisor from now on."""
        self._stopping.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
        if self.process is None or not self.alive():
            return
        self.process.terminate()
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            self.process.kill()
        # Reap it ourselves unless the arbiter already did.
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            self.process.wait(0.5)
