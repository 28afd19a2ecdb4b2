#!/usr/bin/env python3
"""Benchmark the shared-memory store across real processes.

Measures appends/s of 200-byte events (no reader; one waiting reader in another process),
producer -> reader wake latency across processes, fan-out to 1/10/100 reader processes
(chunks delivered per second), and the replay of a full 4 MiB ring (section ``core``);
the shared memory a session allocates for 1 KB / 22 KB / 300 KB / 6 MB answers and
appends/s while a fresh ring grows step by step to its cap (``growth``); lookup / get
p50/p99, creation with and without a session quota, one ``list`` and one gc pass with
1,000 and 10,000 retained sessions in one namespace (``scale``). Prints a table with the
bars to compare against, or one JSON object with ``--json``.

Runs in its own namespace, removed at exit (also on Ctrl-C and SIGTERM).

    .venv/bin/python scripts/bench_store.py            # full run
    .venv/bin/python scripts/bench_store.py --quick    # a few seconds
    .venv/bin/python scripts/bench_store.py --json
    .venv/bin/python scripts/bench_store.py --sections growth,scale --scale 1000,10000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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

CTX = multiprocessing.get_context("fork")

BARS = {  # metric: (comparison, bar)
    "appends_per_s_no_reader": (">=", 1_000_000),
    "appends_per_s_one_reader": (">=", 400_000),
    "wake_p50_us": ("<=", 40),
    "wake_p99_us": ("<=", 250),
    "appends_per_s_growing": (">=", 1_000_000),
}
SCALE_BAR_MS = 5.0  # lookup and get p99 with 10,000 retained sessions
ANSWER_SIZES = (1_000, 22_000, 300_000, 6_000_000)


def wait_for_waiters(session, count: int, timeout: float = 60.0) -> None:
    """Until ``count`` readers sleep on the session (an unlocked peek at the header)."""
    header = session.segment.header
    deadline = time.monotonic() + timeout
    while header.waiters < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {header.waiters} of {count} readers started waiting")
        time.sleep(0.001)


# --- children -------------------------------------------------------------------------------


def _counting_reader(namespace: str, conversation_id: str, results) -> None:
    """Read to the end; a lapped reader skips to the oldest held byte and counts the loss."""
    deadline = child_setup(die_with_parent=True)
    session = ShmStore(namespace).get(conversation_id)
    received, lost = read_to_end(session, deadline)
    results.put((received, lost, monotonic_ns()))
    session.close()


def _latency_reader(namespace: str, results) -> None:
    """Receive timestamps on "ping", note how late each arrived, acknowledge on "pong"."""
    deadline = child_setup(die_with_parent=True)
    store = ShmStore(namespace)
    ping, pong = store.get("ping"), store.get("pong")
    delays = ping_delays(ping, pong, deadline)
    pong.finalize()
    results.put(delays)
    ping.close()
    pong.close()


# --- measurements ---------------------------------------------------------------------------


def bench_appends_no_reader(namespace: str, events: int, repeat: int) -> dict:
    store = ShmStore(namespace, capacity=4 * MIB)
    rates = []
    for run in range(repeat):
        progress(f"appends, no reader: run {run + 1}/{repeat}")
        session = store.create_or_replace(f"solo-{run}")
        append_rate(session, min(events, 20_000))  # warm up
        rates.append(append_rate(session, events)[0])
        session.finalize()
        session.close()
        store.evict(f"solo-{run}")
    return {"appends_per_s_no_reader": max(rates), "runs": rates}


def bench_appends_one_reader(namespace: str, events: int, repeat: int,
                             children: Children) -> dict:
    store = ShmStore(namespace, capacity=4 * MIB)
    rates, delivered, lost = [], [], []
    for run in range(repeat):
        progress(f"appends, one waiting reader: run {run + 1}/{repeat}")
        conversation_id = f"watched-{run}"
        session = store.create_or_replace(conversation_id)
        results = CTX.Queue()
        reader = children.start(_counting_reader, namespace, conversation_id, results)
        wait_for_waiters(session, 1)
        rates.append(append_rate(session, events)[0])
        session.finalize()
        received, lost_bytes, _ = results.get(timeout=CHILD_DEADLINE)
        reader.join(10)
        delivered.append(received)
        lost.append(lost_bytes)
        session.close()
        store.evict(conversation_id)
    best = max(range(repeat), key=lambda k: rates[k])
    return {"appends_per_s_one_reader": rates[best], "runs": rates,
            "reader_received_bytes": delivered[best], "reader_lapped_bytes": lost[best]}


def bench_wake_latency(namespace: str, samples: int, children: Children) -> dict:
    store = ShmStore(namespace, capacity=MIB)
    ping, pong = store.create_or_replace("ping"), store.create_or_replace("pong")
    results = CTX.Queue()
    reader = children.start(_latency_reader, namespace, results)
    acks = pong.read(0)
    ping_header = ping.segment.header
    for index in range(samples):
        if index % 256 == 0:
            progress(f"wake latency: {index}/{samples}")
        # The reader must be asleep in read() when the bytes land: that is the case measured.
        while ping_header.waiters == 0:
            time.sleep(0.00005)
        ping.append(monotonic_ns().to_bytes(8, "little"))
        next(acks)
    ping.finalize()
    delays = sorted(results.get(timeout=CHILD_DEADLINE))
    reader.join(10)
    for session in (ping, pong):
        session.close()
    store.evict("ping")
    store.evict("pong")
    return latency_summary("wake", delays)


def bench_fanout(namespace: str, readers: int, events: int, children: Children) -> dict:
    capacity = max(4 * MIB, events * len(EVENT) + MIB)  # every reader can get every byte
    store = ShmStore(namespace, capacity=capacity)
    conversation_id = f"fanout-{readers}"
    session = store.create_or_replace(conversation_id)
    results = CTX.Queue()
    processes = [children.start(_counting_reader, namespace, conversation_id, results)
                 for _ in range(readers)]
    wait_for_waiters(session, readers)
    progress(f"fan-out to {readers} readers")
    started = monotonic_ns()
    producer_rate, _ = append_rate(session, events)
    session.finalize()
    result = fanout_result(results, processes, events, started, producer_rate)
    session.close()
    store.evict(conversation_id)
    return result


def bench_replay(namespace: str, repeat: int) -> dict:
    capacity = 4 * MIB
    store = ShmStore(namespace, capacity=capacity)
    session, dropped = fill_ring(store, capacity)
    fresh, warm = [], []
    for _ in range(repeat):
        progress("replay of a full ring (fresh handle)")
        fresh.append(fresh_replay(store, dropped, capacity))
    handle = store.get("replay")
    for _ in range(repeat):
        progress("replay of a full ring (warm handle)")
        started = time.perf_counter()
        data = b"".join(handle.read(dropped))
        warm.append(time.perf_counter() - started)
        assert len(data) == capacity
    handle.close()
    session.close()
    store.evict("replay")
    fresh_s, warm_s = statistics.median(fresh), statistics.median(warm)
    return {
        "replay_fresh_ms": fresh_s * 1000,
        "replay_fresh_mb_per_s": capacity / 1e6 / fresh_s,
        "replay_warm_ms": warm_s * 1000,
        "replay_warm_mb_per_s": capacity / 1e6 / warm_s,
    }


# --- growth ----------------------------------------------------------------------------------


def bench_allocation(namespace: str) -> dict:
    """Pages (``du``: st_blocks of the segment, plus its semaphore) per answer size."""
    from shmstream.shm import segment

    store = ShmStore(namespace, capacity=4 * MIB)
    rows = []
    for size in ANSWER_SIZES:
        progress(f"allocated bytes for a {size:,} B answer")
        conversation_id = f"answer-{size}"
        session = store.create_or_replace(conversation_id)
        for _ in range(size // len(EVENT)):
            session.append(EVENT)
        session.finalize()
        info = session.info()
        name = segment.segment_name(namespace, conversation_id)
        rows.append({
            "answer_bytes": size,
            "held_bytes": info.total_bytes - info.dropped_bytes,
            "allocated_bytes": segment.allocated_bytes(name)
            + segment.allocated_bytes("sem." + name),
            "file_size": os.stat(os.path.join(segment.SHM_DIR, name)).st_size,
        })
        session.close()
        store.evict(conversation_id)
    return {"allocation": rows}


def bench_appends_growing(namespace: str, repeat: int) -> dict:
    """Appends/s of 200 B events into a fresh 4 MiB ring, from empty to its cap (every
    growth step included), next to appends into the full ring."""
    store = ShmStore(namespace, capacity=4 * MIB)
    growing, full = [], []
    events = 4 * MIB // len(EVENT)
    for run in range(repeat):
        progress(f"appends while the ring grows: run {run + 1}/{repeat}")
        session = store.create_or_replace(f"grow-{run}")
        growing.append(append_rate(session, events)[0])
        full.append(append_rate(session, events)[0])
        session.close()
        store.evict(f"grow-{run}")
    return {"appends_per_s_growing": max(growing), "appends_per_s_full_ring": max(full)}


# --- scale -----------------------------------------------------------------------------------


def _percentiles(prefix: str, seconds: list[float]) -> dict:
    seconds = sorted(seconds)
    return {f"{prefix}_p50_ms": seconds[len(seconds) // 2] * 1000,
            f"{prefix}_p99_ms": seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] * 1000}


def bench_scale(namespace: str, count: int, samples: int) -> dict:
    """With ``count`` finished 1 KB sessions (ids ``chat-<n>``, every tenth with a
    ``::model`` sibling) retained: lookup of one id, get+close, one list, one gc pass."""
    import random

    store = ShmStore(f"{namespace}s{count}", capacity=4 * MIB)
    ids = []
    try:
        for index in range(count):
            if index % 1000 == 0:
                progress(f"scale {count:,}: creating sessions {index:,}")
            conversation_id = f"chat-{index}" + ("::model" if index % 10 == 1 else "")
            session = store.create_or_replace(conversation_id)
            for _ in range(5):
                session.append(EVENT)
            session.finalize()
            session.close()
            ids.append(conversation_id)
        rng = random.Random(count)
        lookups, gets = [], []
        progress(f"scale {count:,}: lookup and get")
        for _ in range(samples):
            wanted = rng.choice(ids).split("::")[0]
            started = time.perf_counter()
            found = store.lookup([wanted])
            lookups.append(time.perf_counter() - started)
            assert found, wanted
            started = time.perf_counter()
            handle = store.get(rng.choice(ids))
            handle.close()
            gets.append(time.perf_counter() - started)
        progress(f"scale {count:,}: creating with and without a session quota")
        creates = {"create": [], "create_quota": []}
        quota_store = ShmStore(store.namespace, capacity=4 * MIB, max_sessions=count * 10)
        for index in range(min(samples, 1000)):
            for key, creator in (("create", store), ("create_quota", quota_store)):
                started = time.perf_counter()
                session = creator.create_or_replace(f"new-{key}-{index}")
                creates[key].append(time.perf_counter() - started)
                session.close()
                creator.evict(f"new-{key}-{index}")
        progress(f"scale {count:,}: list and gc")
        started = time.perf_counter()
        listed = len(store.list())
        list_s = time.perf_counter() - started
        started = time.perf_counter()
        report = store.gc()
        gc_s = time.perf_counter() - started
        assert listed == count and report.kept == count, (listed, report)
        started = time.perf_counter()
        store.abort_producers()  # one pass from nothing (gunicorn's master), all running
        reap_s = time.perf_counter() - started
        for conversation_id in ids:  # retained: finished within the TTL
            with store.get(conversation_id) as handle:
                handle.finalize()
        started = time.perf_counter()
        store.abort_producers(repeated=True)  # the supervisor's first pass notes them ...
        first_reap_s = time.perf_counter() - started  # (one header read per new session)
        started = time.perf_counter()
        store.abort_producers(repeated=True)  # ... and every later one (each 0.5 s) skips
        reap_again_s = time.perf_counter() - started
        progress(f"scale {count:,}: get while another process runs gc passes")
        collector = CTX.Process(target=_gc_passes, args=(store.namespace, gc_s * 3 + 1))
        collector.start()
        during = []
        while collector.is_alive() and len(during) < samples:
            started = time.perf_counter()
            store.get(rng.choice(ids)).close()
            during.append(time.perf_counter() - started)
        collector.join(60)
    finally:
        store.purge()
    return {"sessions": count, **_percentiles("lookup", lookups), **_percentiles("get", gets),
            **_percentiles("create", creates["create"]),
            **_percentiles("create_quota", creates["create_quota"]),
            **_percentiles("get_during_gc", during or [0.0]),
            "list_ms": list_s * 1000, "gc_pass_ms": gc_s * 1000,
            "reap_pass_ms": reap_s * 1000,
            "supervisor_first_reap_pass_ms": first_reap_s * 1000,
            "supervisor_reap_pass_ms": reap_again_s * 1000}


def _gc_passes(namespace: str, seconds: float) -> None:
    store = ShmStore(namespace, capacity=4 * MIB)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        store.gc()


# --- reporting ------------------------------------------------------------------------------


def meets(metric: str, value: float) -> bool | None:
    if metric not in BARS:
        return None
    comparison, bar = BARS[metric]
    return value >= bar if comparison == ">=" else value <= bar


def print_table(report: dict) -> None:
    rows = [
        ("appends/s, 200 B, no reader", "appends_per_s_no_reader", "{:,.0f}"),
        ("appends/s, 200 B, 1 waiting reader process", "appends_per_s_one_reader", "{:,.0f}"),
        ("wake latency p50 (us), across processes", "wake_p50_us", "{:.1f}"),
        ("wake latency p99 (us), across processes", "wake_p99_us", "{:.1f}"),
        ("wake latency max (us)", "wake_max_us", "{:.1f}"),
    ]
    results = report["results"]
    for fanout in results.get("fanout", []):
        key = f"fanout_{fanout['readers']}"
        results[key] = fanout["chunks_delivered_per_s"]
        results[key + "_producer"] = fanout["producer_appends_per_s"]
        note = "" if fanout["complete"] else " (INCOMPLETE)"
        rows.append((f"1 -> {fanout['readers']} readers: chunks delivered/s{note}", key,
                     "{:,.0f}"))
        rows.append((f"1 -> {fanout['readers']} readers: producer appends/s",
                     key + "_producer", "{:,.0f}"))
    rows += [
        ("replay 4 MiB ring, fresh handle (ms)", "replay_fresh_ms", "{:.2f}"),
        ("replay 4 MiB ring, fresh handle (MB/s)", "replay_fresh_mb_per_s", "{:,.0f}"),
        ("replay 4 MiB ring, warm handle (ms)", "replay_warm_ms", "{:.2f}"),
        ("replay 4 MiB ring, warm handle (MB/s)", "replay_warm_mb_per_s", "{:,.0f}"),
        ("appends/s, 200 B, fresh ring growing to 4 MiB", "appends_per_s_growing", "{:,.0f}"),
        ("appends/s, 200 B, full 4 MiB ring", "appends_per_s_full_ring", "{:,.0f}"),
    ]
    for row in results.get("allocation", []):
        key = f"allocated_{row['answer_bytes']}"
        results[key] = row["allocated_bytes"]
        rows.append((f"allocated B, {row['answer_bytes']:,} B answer "
                     f"(holds {row['held_bytes']:,})", key, "{:,.0f}"))
    for scale in results.get("scale", []):
        n = scale["sessions"]
        for metric in ("lookup_p50_ms", "lookup_p99_ms", "get_p50_ms", "get_p99_ms",
                       "create_p50_ms", "create_p99_ms", "create_quota_p50_ms",
                       "create_quota_p99_ms",
                       "get_during_gc_p50_ms", "get_during_gc_p99_ms", "list_ms",
                       "gc_pass_ms", "reap_pass_ms", "supervisor_first_reap_pass_ms",
                       "supervisor_reap_pass_ms"):
            key = f"scale_{n}_{metric}"
            results[key] = scale[metric]
            rows.append((f"{n:,} sessions: {metric.replace('_', ' ')}", key, "{:.2f}"))
            if n >= 10_000 and metric in ("lookup_p99_ms", "get_p99_ms"):
                BARS[key] = ("<=", SCALE_BAR_MS)
    print(f"{'measurement':<48} {'value':>14}  {'bar':>12}  ok")
    print("-" * 82)
    for label, key, fmt in rows:
        if key not in results:
            continue
        value = results[key]
        bar = ""
        verdict = ""
        if key in BARS:
            comparison, limit = BARS[key]
            bar = f"{comparison} {limit:,}"
            verdict = "yes" if meets(key, value) else "NO"
        print(f"{label:<48} {fmt.format(value):>14}  {bar:>12}  {verdict}")
    print(f"\n{report['cpus']} CPUs, Python {report['python']}, futex doorbell: "
          f"{report['futex']}, events per append run: {report['events']:,}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000,
                        help="appends per throughput run (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="throughput runs, the best one counts (default 3)")
    parser.add_argument("--samples", type=int, default=5_000,
                        help="wake-latency samples (default 5,000)")
    parser.add_argument("--fanout-events", type=int, default=100_000,
                        help="chunks appended in each fan-out run (default 100,000)")
    parser.add_argument("--readers", default="1,10,100",
                        help="reader process counts for fan-out (default 1,10,100)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller runs: 200k events, 1k samples, 20k fan-out chunks")
    parser.add_argument("--sections", default="core,growth,scale",
                        help="what to run, comma-separated: core, growth, scale "
                             "(default all)")
    parser.add_argument("--scale", default="1000,10000",
                        help="retained session counts for the scale section "
                             "(default 1000,10000)")
    parser.add_argument("--scale-samples", type=int, default=2_000,
                        help="lookups and gets timed at each scale (default 2,000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.repeat, args.samples, args.fanout_events = 200_000, 2, 1_000, 20_000
    reader_counts = [int(n) for n in args.readers.split(",") if n.strip()]
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    scale_counts = [int(n) for n in args.scale.split(",") if n.strip()]

    from shmstream.shm import sync

    namespace = f"bench{os.getpid()}x{uuid.uuid4().hex[:8]}"
    children = Children(CTX)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict = {}
    try:
        if "core" in sections:
            results.update(bench_appends_no_reader(namespace, args.events, args.repeat))
            del results["runs"]
            one = bench_appends_one_reader(namespace, args.events, args.repeat, children)
            one.pop("runs")
            results.update(one)
            results.update(bench_wake_latency(namespace, args.samples, children))
            results["fanout"] = [bench_fanout(namespace, n, args.fanout_events, children)
                                 for n in reader_counts]
            results.update(bench_replay(namespace, repeat=20))
        if "growth" in sections:
            results.update(bench_allocation(namespace))
            results.update(bench_appends_growing(namespace, args.repeat))
        if "scale" in sections:
            results["scale"] = [bench_scale(namespace, n, args.scale_samples)
                                for n in scale_counts]
    except KeyboardInterrupt:
        return interrupted()
    finally:
        children.reap()
        ShmStore(namespace).purge()
        for n in scale_counts:
            ShmStore(f"{namespace}s{n}").purge()
    progress("")
    report = {
        "namespace": namespace,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "futex": sync.FUTEX_AVAILABLE,
        "events": args.events,
        "samples": args.samples,
        "fanout_events": args.fanout_events,
        "results": results,
        "bars": {k: {"comparison": c, "bar": b, "meets": meets(k, results.get(k, 0))}
                 for k, (c, b) in BARS.items() if k in results},
    }
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
