"""Prometheus metrics: ``GET /metrics``, the same numbers on every worker.

Two kinds of numbers:

- **Store gauges** (sessions by state, bytes held and reserved, /dev/shm size and free
  space) are computed at scrape time from ``store.list()`` by :class:`StoreCollector`, so
  every worker reports the same truth without keeping any state.
- **Event counters** (sessions created and replaced, bytes appended, offset-lost answers,
  GC removals, reaped producers, upstream errors, sessions ended, the cancel-latency
  histogram and the readers gauge) are counted where they happen, in workers, the
  supervisor and the gunicorn master. Under gunicorn they use prometheus_client's
  multiprocess mode: every process writes its values into its own small mmap'd files in
  ``PROMETHEUS_MULTIPROC_DIR`` and a scrape, on any worker, sums the files of all of them.

The gunicorn master makes that directory, ``/dev/shm/<namespace>.metrics/``, empties it in
``when_ready`` and sets the variable for its workers and the supervisor before any of them
imports prometheus_client (:func:`prepare_directory`); ``child_exit`` drops a dead worker's
live gauges (:func:`process_dead`), and ``on_exit`` / ``ShmStore.purge`` remove it. Without
the variable (tests in one process, a foreign gunicorn config) the counters are this
process's own.

A tmpfs page first touched while /dev/shm is full kills the process with SIGBUS, and
prometheus_client's files are sparse. So each process reserves its files' pages with
``posix_fallocate`` before prometheus_client opens them and creates every labelled child
up front (no entry is ever added later); if the reservation fails, that process counts
nothing rather than risk the signal. Recording functions never raise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time

from shmstream._prometheus_internals import (
    FILE_KINDS,
    ensure_multiprocess_values,
    value_file,
)

log = logging.getLogger("shmstream.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_SUFFIX = ".metrics"
RESERVED_FILE_BYTES = 16 * 1024  # per file; our entries need about 6 KiB
SHM_DIR = "/dev/shm"

STATES = ("running", "done", "cancelled", "failed", "aborted")
ENDED_STATES = STATES[1:]
OFFSET_LOST_PHASES = ("attach", "lapped")
GC_REASONS = ("expired", "corrupt")
REAPERS = ("supervisor", "gc", "child_exit", "shutdown")
UPSTREAM_ERROR_KINDS = ("unreachable", "status", "broken", "proxy")
CANCEL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


def directory_for(namespace: str, shm_dir: str = SHM_DIR) -> str:
    """The multiprocess directory of a namespace: ``/dev/shm/<namespace>.metrics``."""
    return os.path.join(shm_dir, namespace + METRICS_DIR_SUFFIX)


def prepare_directory(namespace: str) -> str:
    """Create (emptied, mode 0700) the namespace's directory and point
    ``PROMETHEUS_MULTIPROC_DIR`` at it for this process and every child it starts.

    Call in the gunicorn master before workers fork. Returns the path.
    """
    path = directory_for(namespace)
    remove_directory(namespace)
    os.mkdir(path, 0o700)
    previous = os.environ.get(MULTIPROC_ENV)
    if previous and previous != path:
        log.warning("%s=%s replaced by %s", MULTIPROC_ENV, previous, path)
    os.environ[MULTIPROC_ENV] = path
    return path


def remove_directory(namespace: str) -> None:
    """Remove the namespace's metrics directory, if any."""
    shutil.rmtree(directory_for(namespace), ignore_errors=True)


def multiprocess_dir() -> str | None:
    path = os.environ.get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


def reserve_files(path: str, pid: int) -> None:
    """Create this process's value files with their pages reserved (raises OSError, e.g.
    ENOSPC). prometheus_client then maps them at this size and never grows them."""
    for kind in FILE_KINDS:
        name = value_file(path, kind, pid)
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                os.posix_fallocate(fd, 0, max(size, RESERVED_FILE_BYTES))
            except OSError:
                if size == 0:  # ours and empty: prometheus_client would map it sparse
                    os.unlink(name)
                raise
        finally:
            os.close(fd)


class Metrics:
    """This process's metric objects (not registered in prometheus_client's global
    registry: a scrape builds its own, see :func:`render`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        if os.environ.get(MULTIPROC_ENV):
            # prometheus_client may have been imported before the variable was set (e.g. by
            # a custom gunicorn config)
            ensure_multiprocess_values()
        options = {"namespace": "shmstream", "registry": None}
        self.sessions_created = Counter(
            "sessions_created", "Sessions created by streamed completion requests.", **options)
        self.sessions_replaced = Counter(
            "sessions_replaced", "Created sessions that replaced one with the same id.",
            **options)
        self.sessions_ended = Counter(
            "sessions_ended", "Sessions whose producer in this service ended, by final state.",
            ["state"], **options)
        self.appended_bytes = Counter(
            "appended_bytes", "Bytes appended to sessions (upstream bytes, pings, errors).",
            **options)
        self.offset_lost = Counter(
            "offset_lost", "Readers whose offset was no longer held: 400 answers (attach) "
            "and readers lapped while reading.", ["phase"], **options)
        self.gc_removed = Counter(
            "gc_removed", "Segments removed by garbage collection.", ["reason"], **options)
        self.producers_reaped = Counter(
            "producers_reaped", "Running sessions finalized as aborted because their "
            "producer died or was stopped, by who noticed.", ["reaper"], **options)
        self.upstream_errors = Counter(
            "upstream_errors", "Upstream failures: unreachable or broken streamed "
            "completions, error statuses, failed proxied requests.", ["kind"], **options)
        self.readers = Gauge(
            "readers", "Responses currently reading a session (GET and completion callers).",
            multiprocess_mode="livesum", **options)
        self.cancel_latency = Histogram(
            "cancel_latency_seconds", "From a session's cancel (DELETE or replace, in any "
            "process) to its producer closing the upstream call.", buckets=CANCEL_BUCKETS,
            **options)
        # Every child exists from the start: its file entry is written now, into pages this
        # process reserved, never later.
        for labelled, values_ in ((self.sessions_ended, ENDED_STATES),
                                  (self.offset_lost, OFFSET_LOST_PHASES),
                                  (self.gc_removed, GC_REASONS),
                                  (self.producers_reaped, REAPERS),
                                  (self.upstream_errors, UPSTREAM_ERROR_KINDS)):
            for value in values_:
                labelled.labels(value)
        self.all = [self.sessions_created, self.sessions_replaced, self.sessions_ended,
                    self.appended_bytes, self.offset_lost, self.gc_removed,
                    self.producers_reaped, self.upstream_errors, self.readers,
                    self.cancel_latency]


_lock = threading.Lock()
_metrics: Metrics | None = None
_pid = 0
_enabled = False


def get() -> Metrics | None:
    """This process's metrics, set up on first use after every fork; None when they are
    off in this process (its files could not be reserved)."""
    global _metrics, _pid, _enabled
    if _pid == os.getpid():
        return _metrics if _enabled else None
    with _lock:
        pid = os.getpid()
        if _pid != pid:
            enabled = True
            path = os.environ.get(MULTIPROC_ENV)
            if path:
                try:
                    reserve_files(path, pid)
                except OSError as exc:
                    log.error("metrics off in pid %d: cannot reserve files in %s (%s)",
                              pid, path, exc.strerror or exc)
                    enabled = False
            if enabled:
                try:
                    if _metrics is None:
                        _metrics = Metrics()
                    else:
                        # Inherited across a fork: touching one value moves every value of
                        # this process into its own (now reserved) files.
                        _metrics.sessions_created.inc(0)
                except Exception:
                    log.exception("metrics off in pid %d", pid)
                    enabled = False
            _enabled = enabled
            _pid = pid
    return _metrics if _enabled else None


def _record(action) -> None:
    """Run ``action(metrics)``; never let bookkeeping break the caller."""
    metrics = get()
    if metrics is None:
        return
    try:
        action(metrics)
    except Exception:
        log.debug("metrics update failed", exc_info=True)


# --- recording (called where things happen) ------------------------------------------------


def session_created(replaced: bool) -> None:
    def action(m: Metrics) -> None:
        m.sessions_created.inc()
        if replaced:
            m.sessions_replaced.inc()

    _record(action)


def session_ended(state_label: str) -> None:
    if state_label in ENDED_STATES:
        _record(lambda m: m.sessions_ended.labels(state_label).inc())


def bytes_appended(count: int) -> None:
    _record(lambda m: m.appended_bytes.inc(count))


def reader_attached() -> None:
    _record(lambda m: m.readers.inc())


def reader_detached() -> None:
    _record(lambda m: m.readers.dec())


def offset_lost(phase: str) -> None:
    _record(lambda m: m.offset_lost.labels(phase).inc())


def upstream_error(kind: str) -> None:
    _record(lambda m: m.upstream_errors.labels(kind).inc())


def cancel_latency(seconds: float) -> None:
    _record(lambda m: m.cancel_latency.observe(max(0.0, seconds)))


def producers_reaped(count: int, reaper: str) -> None:
    if count:
        _record(lambda m: m.producers_reaped.labels(reaper).inc(count))


def gc_report(report) -> None:
    """Count one :class:`~shmstream.store.GCReport` (the supervisor's GC pass)."""
    def action(m: Metrics) -> None:
        if report.expired:
            m.gc_removed.labels("expired").inc(report.expired)
        if report.corrupt_removed:
            m.gc_removed.labels("corrupt").inc(report.corrupt_removed)
        if report.aborted:
            m.producers_reaped.labels("gc").inc(report.aborted)

    _record(action)


def process_dead(pid: int) -> None:
    """A worker died: drop its live gauges (the readers it held are gone with it)."""
    path = multiprocess_dir()
    if path is None:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, path)


# --- scraping ------------------------------------------------------------------------------


class StoreCollector:
    """Gauges computed from the store at scrape time: the same on every worker."""

    def __init__(self, store, shm_dir: str = SHM_DIR):
        self.store = store
        self.shm_dir = shm_dir

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        counts = dict.fromkeys(STATES, 0)
        held = reserved = allocated = capped = 0
        for info in self.store.list():
            counts[info.state.label] = counts.get(info.state.label, 0) + 1
            held += info.total_bytes - info.dropped_bytes
            reserved += info.capacity
            allocated += info.allocated_bytes
            capped += info.ring_capped
        sessions = GaugeMetricFamily("shmstream_sessions", "Sessions in the store, by state.",
                                     labels=["state"])
        for state, count in counts.items():
            sessions.add_metric([state], count)
        yield sessions
        yield GaugeMetricFamily("shmstream_session_held_bytes",
                                "Stream bytes held by all sessions (total - dropped).",
                                value=held)
        yield GaugeMetricFamily("shmstream_session_capacity_bytes",
                                "Ring capacity of all sessions (what they may grow to).",
                                value=reserved)
        yield GaugeMetricFamily("shmstream_session_allocated_bytes",
                                "Storage the sessions occupy now (shm: pages of their "
                                "segments, du-style), next to the bytes they hold.",
                                value=allocated)
        yield GaugeMetricFamily("shmstream_sessions_ring_capped",
                                "Sessions whose ring stopped growing because /dev/shm (or "
                                "the shared-memory quota) was full; they stream on, "
                                "dropping their oldest bytes.", value=capped)
        total = self.store.allocated_bytes()
        if total is not None:
            yield GaugeMetricFamily("shmstream_store_allocated_bytes",
                                    "Storage the whole store occupies (shm: every segment "
                                    "and semaphore of the namespace, replaced ones that "
                                    "readers still map included).", value=total)
        try:
            stats = os.statvfs(self.shm_dir)
        except OSError:
            return
        yield GaugeMetricFamily("shmstream_shm_size_bytes", f"Size of {self.shm_dir}.",
                                value=stats.f_blocks * stats.f_frsize)
        yield GaugeMetricFamily("shmstream_shm_free_bytes", f"Free space in {self.shm_dir}.",
                                value=stats.f_bavail * stats.f_frsize)


def render(store) -> tuple[bytes, str]:
    """The exposition (text format) and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path is not None:
        MultiProcessCollector(registry, path=path)
    else:
        metrics = get()
        for metric in metrics.all if metrics is not None else ():
            registry.register(metric)
    registry.register(StoreCollector(store))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsResource:
    """``GET /metrics``: Prometheus text format. It needs the API key when one is set."""

    def __init__(self, store):
        self.store = store

    def on_get(self, req, resp) -> None:
        started = time.monotonic()
        resp.data, resp.content_type = render(self.store)
        log.debug("metrics rendered in %.1f ms", (time.monotonic() - started) * 1000)

    on_head = on_get
