#!/usr/bin/env python3
"""Benchmark the shared-memory and Redis backends side by side, through the store interface.

The same workloads run on each backend in one run, with the same event size and counts:
appends/s of 200 B events, producer -> reader latency across processes (p50/p99), one
producer fanning out to 1/10/100 reader processes (chunks delivered per second), and the
replay of a full 4 MiB session by a fresh handle, and the storage a finished session
costs for 1 KB / 22 KB / 300 KB / 4 MiB / 6 MB answers (``SessionInfo.allocated_bytes``;
on Redis also ``used_memory`` per 22 KB session). Prints a table with the ratio per row, or
one JSON object with ``--json``. Starts its own ``redis-server`` on a free loopback port
(persistence off) and removes everything it made at exit.

    .venv/bin/python scripts/bench_backends.py            # full run (about a minute)
    .venv/bin/python scripts/bench_backends.py --quick    # a few seconds per backend
    .venv/bin/python scripts/bench_backends.py --json --backends redis
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tests/redis_server.py: the throwaway redis-server the tests use
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from benchkit import (
    CHILD_DEADLINE,
    EVENT,
    MIB,
    Children,
    append_rate,
    child_setup,
    fanout_result,
    fill_ring,
    fresh_replay,
    interrupted,
    latency_summary,
    monotonic_ns,
    ping_delays,
    progress,
    read_to_end,
)

from shmstream.shm.store import ShmStore

# Children come from a fork server with the backends preloaded: cheap to start, and never
# forked from a parent whose Redis listener/lease threads hold locks at that moment.
CTX = multiprocessing.get_context("forkserver")


def open_store(backend: str, namespace: str, capacity: int = 4 * MIB):
    """``backend`` is "shm" or a redis:// URL; any process can call this."""
    if backend == "shm":
        return ShmStore(namespace, capacity=capacity)
    from shmstream.redis.store import RedisStore

    return RedisStore.from_url(backend, namespace=namespace, capacity=capacity)


def purge(backend: str, namespace: str) -> None:
    store = open_store(backend, namespace)
    store.purge()
    store.close()


# --- children -------------------------------------------------------------------------------


def _counting_reader(backend: str, namespace: str, conversation_id: str, ready, results):
    """Take the first chunk (the session's opening byte), say so, then read to the end; a
    lapped reader skips to the oldest held byte and counts the loss."""
    deadline = child_setup(die_with_parent=False)
    store = open_store(backend, namespace)
    session = store.get(conversation_id)
    received, lost = read_to_end(session, deadline,
                                 on_first_chunk=lambda: ready.put(os.getpid()))
    results.put((received - 1, lost, monotonic_ns()))
    session.close()
    store.close()


def _latency_reader(backend: str, namespace: str, results) -> None:
    """Note how late each timestamp on "ping" arrived; acknowledge each on "pong"."""
    deadline = child_setup(die_with_parent=False)
    store = open_store(backend, namespace, capacity=MIB)
    ping, pong = store.get("ping"), store.get("pong")
    delays = ping_delays(ping, pong, deadline)
    results.put(delays)
    ping.close()
    pong.close()
    store.close()


# --- measurements ---------------------------------------------------------------------------


def bench_appends(backend: str, namespace: str, seconds: float, repeat: int) -> dict:
    store = open_store(backend, namespace)
    rates = []
    for run in range(repeat):
        progress(f"{label(backend)}: appends, run {run + 1}/{repeat}")
        session = store.create_or_replace(f"solo-{run}")
        append_rate(session, 10**9, min(0.2, seconds))  # warm up (script cache, pages)
        rate, _ = append_rate(session, 10**9, seconds)
        rates.append(rate)
        session.finalize()
        session.close()
        store.evict(f"solo-{run}")
    store.close()
    return {"appends_per_s": max(rates)}


def bench_latency(backend: str, namespace: str, samples: int, pause: float,
                  children: Children) -> dict:
    """Ping-pong: one timestamped append, the reader process acknowledges, a pause lets it
    fall asleep again, so every sample measures a wake-up of a sleeping reader."""
    store = open_store(backend, namespace, capacity=MIB)
    ping, pong = store.create_or_replace("ping"), store.create_or_replace("pong")
    results = CTX.Queue()
    reader = children.start(_latency_reader, backend, namespace, results)
    acks = pong.read(0)
    padding = EVENT[:-8]
    for index in range(samples):
        if index % 256 == 0:
            progress(f"{label(backend)}: latency {index}/{samples}")
        time.sleep(pause)
        ping.append(padding + monotonic_ns().to_bytes(8, "little"))
        next(acks)
    ping.finalize()
    delays = sorted(results.get(timeout=CHILD_DEADLINE))
    reader.join(10)
    acks.close()
    for session in (ping, pong):
        session.close()
    store.evict("ping")
    store.evict("pong")
    store.close()
    return latency_summary("latency", delays)


def bench_fanout(backend: str, namespace: str, readers: int, events: int,
                 children: Children) -> dict:
    capacity = max(4 * MIB, events * len(EVENT) + MIB)  # every reader can get every byte
    store = open_store(backend, namespace, capacity=capacity)
    conversation_id = f"fanout-{readers}"
    session = store.create_or_replace(conversation_id)
    session.append(b"#")  # each reader takes this, then reports that it waits
    ready, results = CTX.Queue(), CTX.Queue()
    processes = [children.start(_counting_reader, backend, namespace, conversation_id, ready,
                                results) for _ in range(readers)]
    for index in range(readers):
        progress(f"{label(backend)}: fan-out, {index}/{readers} readers waiting")
        ready.get(timeout=CHILD_DEADLINE)
    time.sleep(0.1 + readers * 0.002)  # from "about to wait" to asleep
    progress(f"{label(backend)}: fan-out to {readers} readers")
    started = monotonic_ns()
    producer_rate, _ = append_rate(session, events, 3600.0)
    session.finalize()
    result = fanout_result(results, processes, events, started, producer_rate)
    session.close()
    store.evict(conversation_id)
    store.close()
    return result


def bench_replay(backend: str, namespace: str, repeat: int) -> dict:
    capacity = 4 * MIB
    store = open_store(backend, namespace, capacity=capacity)
    session, dropped = fill_ring(store, capacity)
    timings = []
    for run in range(repeat):
        progress(f"{label(backend)}: replay {run + 1}/{repeat}")
        timings.append(fresh_replay(store, dropped, capacity))
    session.close()
    store.evict("replay")
    store.close()
    seconds = statistics.median(timings)
    return {"replay_ms": seconds * 1000, "replay_mb_per_s": capacity / 1e6 / seconds}


# Answer sizes whose storage cost is measured: a short reply, a typical chat answer (22 KB
# of SSE), a long one, one that fills the default 4 MiB ring and one that wraps it.
MEMORY_ANSWERS = [("1k", 1_000), ("22k", 22_000), ("300k", 300_000), ("4m", 4 * MIB),
                  ("6m", 6_000_000)]


def bench_memory(backend: str, namespace: str, sessions: int) -> dict:
    """Storage per finished session, as ``SessionInfo.allocated_bytes`` reports it (shm: pages
    of its segment; Redis: ``MEMORY USAGE`` of its keys), for answers of 200 B events. On
    Redis also the growth of ``used_memory`` per 22 KB session over ``sessions`` of them,
    which counts everything (index, expiry zset, key overhead)."""
    capacity = 4 * MIB
    store = open_store(backend, namespace, capacity=capacity)
    results: dict = {}
    for name, size in MEMORY_ANSWERS:
        progress(f"{label(backend)}: memory of a {name} answer")
        session = store.create_or_replace(f"memory-{name}")
        append_rate(session, -(-size // len(EVENT)))
        session.finalize()
        info = session.info()
        held = info.total_bytes - info.dropped_bytes
        results[f"memory_{name}_allocated"] = info.allocated_bytes
        results[f"memory_{name}_per_held_byte"] = info.allocated_bytes / held
        session.close()
        store.evict(f"memory-{name}")
    if backend != "shm":
        import redis

        client = redis.Redis.from_url(backend)
        before = client.info("memory")["used_memory"]
        for index in range(sessions):
            if index % 100 == 0:
                progress(f"{label(backend)}: {index}/{sessions} sessions of 22 KB")
            session = store.create_or_replace(f"memory-many-{index}")
            append_rate(session, 22_000 // len(EVENT))
            session.finalize()
            session.close()
        results["memory_used_per_22k_session"] = (
            (client.info("memory")["used_memory"] - before) / sessions)
        client.close()
    store.close()
    return results


def run_backend(backend: str, args, reader_counts: list[int]) -> dict:
    namespace = f"benchb{os.getpid()}x{uuid.uuid4().hex[:8]}"
    children = Children(CTX)
    results: dict = {}
    try:
        results.update(bench_appends(backend, namespace, args.seconds, args.repeat))
        results.update(bench_latency(backend, namespace, args.samples, args.pause, children))
        for readers in reader_counts:
            fanout = bench_fanout(backend, namespace, readers, args.fanout_events, children)
            results[f"fanout_{readers}_chunks_per_s"] = fanout["chunks_delivered_per_s"]
            results[f"fanout_{readers}_producer_appends_per_s"] = fanout["producer_appends_per_s"]
            results[f"fanout_{readers}_complete"] = fanout["complete"]
        results.update(bench_replay(backend, namespace, repeat=args.replays))
        results.update(bench_memory(backend, namespace, args.memory_sessions))
    finally:
        children.reap()
        purge(backend, namespace)
    return results


# --- reporting ------------------------------------------------------------------------------


def label(backend: str) -> str:
    return "shm" if backend == "shm" else "redis"


# (key, text, format, higher is better)
ROWS = [
    ("appends_per_s", "appends/s, 200 B events, no reader", "{:,.0f}", True),
    ("latency_p50_us", "producer->reader latency p50 (us)", "{:,.1f}", False),
    ("latency_p99_us", "producer->reader latency p99 (us)", "{:,.1f}", False),
    ("latency_max_us", "producer->reader latency max (us)", "{:,.1f}", False),
]
TAIL_ROWS = [
    ("replay_ms", "replay 4 MiB, fresh handle (ms)", "{:,.2f}", False),
    ("replay_mb_per_s", "replay 4 MiB, fresh handle (MB/s)", "{:,.0f}", True),
]
for _name, _size in MEMORY_ANSWERS:
    TAIL_ROWS.append((f"memory_{_name}_allocated", f"storage of a {_name} answer (B)",
                      "{:,.0f}", False))
    TAIL_ROWS.append((f"memory_{_name}_per_held_byte", f"  ... per byte held ({_name})",
                      "{:,.2f}", False))
TAIL_ROWS.append(("memory_used_per_22k_session", "Redis used_memory per 22k session (B)",
                  "{:,.0f}", False))


def table_rows(reader_counts: list[int]) -> list[tuple[str, str, str, bool]]:
    rows = list(ROWS)
    for readers in reader_counts:
        rows.append((f"fanout_{readers}_chunks_per_s",
                     f"1 -> {readers} reader processes: chunks/s", "{:,.0f}", True))
        rows.append((f"fanout_{readers}_producer_appends_per_s",
                     f"1 -> {readers} readers: producer appends/s", "{:,.0f}", True))
    return rows + TAIL_ROWS


def ratios(report: dict, rows) -> dict:
    """How many times better shm is than Redis, per metric (> 1: shm is better)."""
    shm, red = report.get("shm"), report.get("redis")
    if not shm or not red:
        return {}
    out = {}
    for key, _, _, higher_is_better in rows:
        a, b = shm.get(key), red.get(key)
        if not a or not b:
            continue
        out[key] = a / b if higher_is_better else b / a
    return out


def print_table(report: dict, rows) -> None:
    backends = [name for name in ("shm", "redis") if name in report]
    header = f"{'measurement':<44}" + "".join(f"{name:>14}" for name in backends)
    if len(backends) == 2:
        header += f"{'shm advantage':>16}"
    print(header)
    print("-" * len(header))
    for key, text, fmt, _ in rows:
        values = [report[name].get(key) for name in backends]
        if all(value is None for value in values):
            continue
        line = f"{text:<44}" + "".join(
            f"{fmt.format(value) if value is not None else '-':>14}" for value in values
        )
        ratio = report["ratio"].get(key)
        if ratio is not None:
            line += f"{ratio:>15.1f}x"
        print(line)
    incomplete = [f"{name}: {key}" for name in backends for key, value in report[name].items()
                  if key.endswith("_complete") and not value]
    if incomplete:
        print("INCOMPLETE fan-out runs (bytes lost or missing): " + ", ".join(incomplete))
    env = report["env"]
    print(f"\n{env['cpus']} CPUs, Python {env['python']}, redis-server {env['redis_server']}, "
          f"redis-py {env['redis_py']}, hiredis: {env['hiredis']}; append runs "
          f"{env['seconds']} s, {env['samples']} latency samples, "
          f"{env['fanout_events']:,} fan-out chunks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="shm,redis", help="default: shm,redis")
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis instead of starting a private redis-server")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="length of each append-rate run (default 2 s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="append-rate runs, the best counts (default 3)")
    parser.add_argument("--samples", type=int, default=2_000,
                        help="latency samples (default 2,000)")
    parser.add_argument("--pause", type=float, default=0.002,
                        help="seconds between latency samples (default 0.002)")
    parser.add_argument("--fanout-events", type=int, default=20_000,
                        help="chunks appended in each fan-out run (default 20,000)")
    parser.add_argument("--readers", default="1,10,100",
                        help="reader process counts for fan-out (default 1,10,100)")
    parser.add_argument("--replays", type=int, default=10, help="replay runs (median)")
    parser.add_argument("--memory-sessions", type=int, default=1_000,
                        help="22 KB sessions whose total Redis memory is measured "
                             "(default 1,000)")
    parser.add_argument("--quick", action="store_true",
                        help="0.5 s append runs, 500 samples, 5,000 fan-out chunks")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat, args.samples, args.fanout_events = 0.5, 2, 500, 5_000
        args.replays = 5
        args.memory_sessions = 100
    reader_counts = [int(n) for n in args.readers.split(",") if n.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    import redis
    from redis_server import LocalRedisServer

    CTX.set_forkserver_preload(["shmstream.shm.store", "shmstream.redis.store"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = None
    report: dict = {}
    try:
        url = args.redis_url
        if "redis" in backends and url is None:
            server = LocalRedisServer()
            url = server.start()
        for backend in backends:
            spec = url if backend == "redis" else backend
            report[backend] = run_backend(spec, args, reader_counts)
        redis_version = ""
        if url is not None:
            client = redis.Redis.from_url(url)
            redis_version = client.info("server").get("redis_version", "")
            client.close()
    except KeyboardInterrupt:
        return interrupted()
    finally:
        if server is not None:
            server.stop()
    progress("")
    rows = table_rows(reader_counts)
    try:
        import hiredis  # noqa: F401

        has_hiredis = True
    except ImportError:
        has_hiredis = False
    report["ratio"] = ratios(report, rows)
    report["env"] = {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "redis_server": redis_version, "redis_py": redis.__version__, "hiredis": has_hiredis,
        "seconds": args.seconds, "samples": args.samples, "pause": args.pause,
        "fanout_events": args.fanout_events, "readers": reader_counts,
    }
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print_table(report, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
