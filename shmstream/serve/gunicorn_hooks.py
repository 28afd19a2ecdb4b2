"""gunicorn server hooks: the master's side of shmstream's process model.

- ``when_ready``: start the supervisor child (restarted if it dies), and make SIGTERM,
  SIGINT and SIGQUIT abort the workers' running sessions before gunicorn stops them, so
  readers end at once instead of holding the shutdown for the graceful timeout.
- ``child_exit``: a worker died (crash, SIGKILL, timeout): abort the sessions it produced
  and release any lock it held, at once, without waiting for the supervisor.
- ``on_reload`` (SIGHUP): nothing to move; segments live in /dev/shm and old workers finish
  their streams within the graceful timeout.
- ``on_exit``: stop the supervisor and abort whatever still runs.

The master also owns the Prometheus multiprocess directory (:mod:`shmstream.metrics`): it
makes it empty in ``when_ready``, before the supervisor and the workers start, drops a dead
worker's live gauges in ``child_exit`` and removes it in ``on_exit``.
"""

from __future__ import annotations

import logging

from shmstream import metrics
from shmstream.backends import open_store
from shmstream.config import Settings
from shmstream.serve import startup
from shmstream.serve.supervisor import SupervisorProcess

log = logging.getLogger("shmstream.gunicorn")

_state: dict = {}


def _settings() -> Settings:
    if "settings" not in _state:
        _state["settings"] = Settings.from_env()
    return _state["settings"]


def _store():
    # The master opens the store lazily and keeps no mapping open: workers fork from it.
    if "store" not in _state:
        _state["store"] = open_store(_settings())
    return _state["store"]


def on_starting(server) -> None:
    # First, before anything touches the namespace: one live service per namespace, and a
    # store that answers (shmstream.serve.startup; a failure stops gunicorn with one line).
    startup.prepare_master()


def when_ready(server) -> None:
    # Route shmstream's own loggers in the master through gunicorn's error log.
    package_log = logging.getLogger("shmstream")
    if not package_log.handlers:
        for handler in server.log.error_log.handlers:
            package_log.addHandler(handler)
        package_log.setLevel(server.log.error_log.level)
        package_log.propagate = False
    settings = _settings()
    server.log.info(
        "shmstream ready: upstream=%s backend=%s namespace=%s max_bytes=%d ttl=%.0fs",
        settings.upstream or "built-in demo", settings.backend, settings.namespace,
        settings.max_bytes, settings.ttl,
    )
    try:  # before any child starts: they inherit the variable
        metrics_dir = metrics.prepare_directory(settings.namespace)
        server.log.info("metrics: multiprocess directory %s", metrics_dir)
    except OSError as exc:
        server.log.error("metrics: cannot create the multiprocess directory (%s); each "
                         "worker will report only its own counters", exc)
    supervisor = SupervisorProcess(settings)
    supervisor.start()
    _state["supervisor"] = supervisor
    for name in ("handle_term", "handle_int", "handle_quit"):
        _abort_before(server, name)


def _abort_before(server, handler_name: str) -> None:
    original = getattr(server, handler_name)

    def handler():
        pids = list(server.WORKERS)
        try:
            aborted = _store().abort_producers(pids)
            server.log.info("shutdown: aborted %d running session(s)", aborted)
            metrics.producers_reaped(aborted, "shutdown")
        except Exception:
            server.log.exception("shutdown: could not abort running sessions")
        return original()

    setattr(server, handler_name, handler)


def child_exit(server, worker) -> None:
    metrics.process_dead(worker.pid)  # its readers are gone with it
    try:
        aborted = _store().abort_producers([worker.pid])
    except Exception:
        server.log.exception("could not reap sessions of worker %s", worker.pid)
        return
    if aborted:
        server.log.warning("worker %s exited: aborted %d of its running session(s)",
                           worker.pid, aborted)
        metrics.producers_reaped(aborted, "child_exit")


def on_reload(server) -> None:
    server.log.info("reload: sessions stay in shared memory")


def on_exit(server) -> None:
    supervisor = _state.pop("supervisor", None)
    if supervisor is not None:
        supervisor.stop()
    try:
        aborted = _store().abort_producers()
        if aborted:
            server.log.info("exit: aborted %d orphaned session(s)", aborted)
    except Exception:
        server.log.exception("exit: could not abort running sessions")
    metrics.remove_directory(_settings().namespace)
