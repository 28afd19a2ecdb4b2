"""Producer liveness in Redis: leases renewed by the producing process, and its identity.

The creating store renews a lease key (``PX lease``) of each session it produces from one
background thread every ``lease / 4``. A running session without a lease is finalized
``aborted`` by ``gc`` or by any reader that finds it while waiting. The identity recorded
with each session (:func:`producer_identity`) lets ``abort_producers`` on the same machine
reap a dead producer at once, without waiting for its lease.
"""

from __future__ import annotations

import logging
import threading

import redis

from shmstream.redis.connections import Health, is_unavailable
from shmstream.redis.notifier import Watch
from shmstream.store.procs import machine_scope, process_start_time

log = logging.getLogger("shmstream.redis")


def producer_identity(pid: int) -> str:
    """A producer process, named so that no other host's or container's can match it:
    ``<machine scope>/<pid>/<start time>``."""
    return f"{machine_scope()}/{pid}/{process_start_time(pid)}"


def parse_identity(identity: str, scope: str) -> tuple[int, int] | None:
    """``(pid, start time)`` of an identity made in ``scope`` (this machine), else None."""
    prefix = scope + "/"
    if not identity.startswith(prefix):
        return None
    pid_text, _, start_text = identity[len(prefix):].partition("/")
    return int(pid_text), int(start_text or 0)


class LeaseKeeper:
    """Renews the leases of the sessions this store produces, from one background thread.

    A session leaves the set when it finishes. The answers also reach the producers' control
    watches, a fallback for a cancel message lost while pub/sub was down.
    """

    def __init__(self, renew_script, prefix: str, lease: float, health: Health):
        self._health = health  # an outage is this process's one line (down, back), not ours
        self._renew = renew_script
        self._prefix = prefix
        self._lease_ms = str(int(lease * 1000))
        self._interval = lease / 4
        self._lock = threading.Lock()
        self._gens: dict[str, list[Watch]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmstream-redis-lease",
                                        daemon=True)
        self._thread.start()

    def add(self, gen: str, watch: Watch | None) -> None:
        with self._lock:
            watches = self._gens.setdefault(gen, [])
            if watch is not None:
                watches.append(watch)

    def discard(self, gen: str) -> None:
        with self._lock:
            self._gens.pop(gen, None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        failing = False  # one log line when renewals start failing, one when they work
        while not self._stop.wait(self._interval):
            with self._lock:
                gens = list(self._gens)
            if not gens:
                continue
            try:
                answers = self._renew(args=[self._prefix, self._lease_ms, *gens])
            except redis.RedisError as exc:
                if is_unavailable(exc):
                    self._health.failed(exc)
                    continue
                if not failing:
                    log.warning("lease renewal failed (%s); retrying every %.1f s", exc,
                                self._interval)
                failing = True
                continue
            if self._health.down:
                self._health.succeeded()
            if failing:
                failing = False
                log.warning("lease renewal works again")
            with self._lock:
                for gen, answer in zip(gens, answers, strict=True):
                    if answer == 0:
                        continue
                    for watch in self._gens.get(gen, ()):
                        watch.stopped = True
                        watch.bump()
                    if answer == 2:
                        self._gens.pop(gen, None)
