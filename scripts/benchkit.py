"""What the benchmark scripts share: the event, the clock, child processes and their reader
loops, the append loop, the summaries of a latency, fan-out and replay run, and the CPU of
a process tree. Imported by those scripts after they put the repository root on
``sys.path`` (the scripts directory is there already, as the directory of the script run).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import sys
import time

from shmstream import OffsetLost

EVENT = b"x" * 199 + b"\n"  # 200 B
MIB = 1024 * 1024
PR_SET_PDEATHSIG = 1
CHILD_DEADLINE = 300.0  # a child gives up after this long, whatever happens to the parent


def process_tree_cpu(root_pids: list[int]) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each live process in the trees under ``root_pids``,
    from ``/proc/<pid>/stat``."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), int(fields[11]) / tick, int(fields[12]) / tick)
    wanted, grew = set(root_pids), True
    while grew:
        grew = False
        for pid, (parent, _, _) in stats.items():
            if parent in wanted and pid not in wanted:
                wanted.add(pid)
                grew = True
    return {pid: stats[pid][1:] for pid in wanted if pid in stats}


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC is one clock for every process on the host: deltas across processes
    are meaningful (perf_counter is the same clock on Linux, but say so explicitly)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def progress(message: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()


def interrupted() -> int:
    """After Ctrl-C, before the cleanup: say so; the exit status."""
    progress("")
    print("interrupted; cleaning up", file=sys.stderr)
    return 130


def child_setup(*, die_with_parent: bool) -> float:
    """Children ignore Ctrl-C (the parent cleans up), with ``die_with_parent`` die with the
    process that started them, and return their deadline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if die_with_parent:
        with contextlib.suppress(OSError, AttributeError):  # Linux only: PR_SET_PDEATHSIG
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return time.monotonic() + CHILD_DEADLINE


class Children:
    """Processes started from the multiprocessing context ``ctx``, all killed and reaped by
    :meth:`reap`."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.started: list = []

    def start(self, target, *args):
        process = self.ctx.Process(target=target, args=args, daemon=True)
        process.start()
        self.started.append(process)
        return process

    def reap(self) -> None:
        for process in self.started:
            if process.is_alive():
                process.kill()
        for process in self.started:
            process.join(10)
        self.started.clear()


# --- in the children ------------------------------------------------------------------------


def read_to_end(session, deadline: float, on_first_chunk=None) -> tuple[int, int]:
    """Read ``session`` from its start to its end: (bytes received, bytes lost). A lapped
    reader skips to the oldest held byte and counts the loss. ``on_first_chunk`` is called
    once, after the first chunk: the loop is then about to wait for the producer."""
    received = lost = 0
    offset = 0
    while True:
        try:
            for chunk in session.read(offset, should_stop=lambda: time.monotonic() > deadline):
                received += len(chunk)
                offset += len(chunk)
                if on_first_chunk is not None:
                    on_first_chunk()
                    on_first_chunk = None
            break
        except OffsetLost:
            dropped = session.info().dropped_bytes
            lost += dropped - offset
            offset = dropped
    return received, lost


def ping_delays(ping, pong, deadline: float) -> list[int]:
    """Note how late each chunk on ``ping`` arrived (its last 8 bytes are the
    :func:`monotonic_ns` it was sent at), in ns; acknowledge each on ``pong``."""
    delays = []
    for chunk in ping.read(0, should_stop=lambda: time.monotonic() > deadline):
        arrived = monotonic_ns()
        delays.append(arrived - int.from_bytes(chunk[-8:], "little"))
        pong.append(b"k")
    return delays


# --- in the parent --------------------------------------------------------------------------


def append_rate(session, max_events: int, seconds: float = math.inf) -> tuple[float, int]:
    """Append 200 B events, ``max_events`` of them or for about ``seconds`` (looked at every
    500 appends), whichever ends first: (appends/s, appends)."""
    append = session.append
    payload = EVENT
    count = 0
    started = time.perf_counter()
    stop_at = started + seconds
    while count < max_events:
        batch = min(500, max_events - count)
        for _ in range(batch):
            append(payload)
        count += batch
        if time.perf_counter() >= stop_at:
            break
    return count / (time.perf_counter() - started), count


def latency_summary(prefix: str, delays: list[int]) -> dict:
    """p50/p99/max in microseconds and the count of ``delays`` (ns, sorted)."""
    return {
        f"{prefix}_p50_us": delays[len(delays) // 2] / 1000,
        f"{prefix}_p99_us": delays[min(len(delays) - 1, int(len(delays) * 0.99))] / 1000,
        f"{prefix}_max_us": delays[-1] / 1000,
        f"{prefix}_samples": len(delays),
    }


def fanout_result(results, processes: list, events: int, started: int,
                  producer_rate: float) -> dict:
    """Collect each reader's (bytes received, bytes lost, finished at) from ``results``, join
    the readers, and sum up a fan-out of ``events`` events that started at ``started``."""
    readers = len(processes)
    outcomes = [results.get(timeout=CHILD_DEADLINE) for _ in range(readers)]
    for process in processes:
        process.join(10)
    finished = max(end for _, _, end in outcomes)
    seconds = (finished - started) / 1e9
    received = sum(r for r, _, _ in outcomes)
    lost = sum(lost for _, lost, _ in outcomes)
    return {
        "readers": readers,
        "chunks": events,
        "seconds": seconds,
        "chunks_delivered_per_s": received / len(EVENT) / seconds,
        "producer_appends_per_s": producer_rate,
        "complete": received == readers * events * len(EVENT) and lost == 0,
    }


def fill_ring(store, capacity: int):
    """A finalized session "replay" whose ring of ``capacity`` bytes is full and has wrapped:
    (session, its first held offset)."""
    session = store.create_or_replace("replay")
    for _ in range((capacity + 64 * 1024) // len(EVENT)):  # full, and wrapped
        session.append(EVENT)
    session.finalize()
    return session, session.info().dropped_bytes


def fresh_replay(store, offset: int, capacity: int) -> float:
    """Seconds to open a new handle on "replay" and read it all from ``offset``."""
    started = time.perf_counter()
    handle = store.get("replay")
    data = b"".join(handle.read(offset))
    handle.close()
    seconds = time.perf_counter() - started
    assert len(data) == capacity, len(data)
    return seconds
