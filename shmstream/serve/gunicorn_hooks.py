"""gunicorn server hooks: the master's side of shmstream's process model.

- ``when_ready``: start the supervisor child and the relay processes (:mod:`shmstream.serve.
  relays`: they produce every session; HTTP workers hand completions to them), both
  restarted if they die; wrap the stop signals so the children stop in order:
  SIGTERM -> relays finish their answers within the graceful timeout; SIGINT/SIGQUIT ->
  relays abort at once. Nothing is restarted once a stop began (issue 14, item 5).
- ``child_exit``: an HTTP worker died (crash, SIGKILL, timeout): release what it held.
  Its callers' answers go on in the relays.
- ``on_reload`` (SIGHUP): new relays take new answers; the old ones finish theirs and exit.
- ``on_exit``: wait for the relays (what still runs then ends ``aborted``), stop the
  supervisor, abort whatever still runs.

The master also owns the Prometheus multiprocess directory (:mod:`shmstream.metrics`): it
makes it empty in ``when_ready``, before the supervisor, the relays and the workers start,
drops a dead worker's live gauges in ``child_exit`` and removes it in ``on_exit``.
"""

from __future__ import annotations

import logging

from shmstream import metrics
from shmstream.backends import open_store
from shmstream.config import Settings
from shmstream.serve import _gunicorn_internals, startup
from shmstream.serve.relays import RelayPool
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
    relays = RelayPool(settings, _abort_producers)
    relays.start()  # before the workers fork: they inherit SHMSTREAM_RELAY_SOCKET
    _state["relays"] = relays
    server.log.info("relays: %d process(es) on %s, graceful timeout %gs", relays.count,
                    relays.socket_path, relays.graceful_timeout)
    _gunicorn_internals.before_stop_signals(server, lambda graceful: _begin_stop(server, graceful))


def _abort_producers(pids: list[int]) -> int:
    aborted = _store().abort_producers(pids)
    if aborted:
        metrics.producers_reaped(aborted, "child_exit")
    return aborted


def _begin_stop(server, graceful: bool) -> None:
    """The master got SIGTERM (graceful) or SIGINT/SIGQUIT, before gunicorn handles it: no
    child is restarted from now on; the relays get SIGTERM (finish within the graceful
    timeout) or SIGQUIT (abort now)."""
    supervisor = _state.get("supervisor")
    if supervisor is not None:
        supervisor.begin_stop()
    relays = _state.get("relays")
    if relays is not None:
        relays.begin_stop(graceful)
    server.log.info("%s: relays %s", "graceful stop" if graceful else "quick stop",
                    "finish their answers" if graceful else "abort their answers")


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
    relays = _state.get("relays")
    if relays is not None:
        relays.reload()


def on_exit(server) -> None:
    relays = _state.pop("relays", None)
    if relays is not None:
        relays.stop()
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
