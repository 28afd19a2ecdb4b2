#!/usr/bin/env python3
"""HTTP benchmark of the whole service: the latency shmstream adds to streamed events, many
concurrent readers of one session, and the replay speed of a full 4 MiB session.

It starts its own scripted SSE upstream (``tests/sse_upstream.py``) and gunicorn (the
repository's ``gunicorn.conf.py``), runs, and stops both.

1. Latency: S streams at R events/s through the service (completion POSTs with a
   conversation id, so every byte goes through a shared-memory session) and, at the same
   time, S streams straight to the upstream. Each event carries the upstream's send time
   (``time.monotonic_ns()``, one clock for all processes on the host); the difference of the
   two paths' latency percentiles is what the service adds.
2. Readers: one slow session read by N concurrent ``GET /v1/stream/{id}`` clients; every
   one must get status 200 and exactly the upstream's bytes.
3. Replay: ``GET ?from=<dropped>`` of a session holding a full 4 MiB ring, in MB/s.
4. Cancel: DELETE (on a fresh connection, so on any worker) while the upstream is silent,
   mid-stream or during prompt processing: time until the upstream sees its client go.

``--llama`` runs against the real llama-server instead (scripts/bench_llama.py: the latency
shmstream adds over a direct connection, and Stop -> slot idle).

    .venv/bin/python scripts/bench_http.py                    # 100 x 100/s, 4 workers
    .venv/bin/python scripts/bench_http.py --streams 20 --duration 5 --readers 200
    .venv/bin/python scripts/bench_http.py --llama [--streams 2 --tokens 500 --stops 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import httpx  # noqa: E402
from benchkit import process_tree_cpu  # noqa: E402
from service import Service  # noqa: E402
from sse_upstream import UpstreamProcess  # noqa: E402

from shmstream.shm.store import ShmStore  # noqa: E402


class Stats:
    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        self.events = 0
        self.errors: list[str] = []


def _request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _open(port: int, request: bytes):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return reader, writer, status, head


async def _chunks(reader: asyncio.StreamReader):
    """The decoded chunks of a chunked body, until its terminator."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


def _stamp(event: bytes) -> int | None:
    at = event.find(b'"t":')
    if at < 0:
        return None
    end = at + 4
    while end < len(event) and 48 <= event[end] <= 57:
        end += 1
    return int(event[at + 4:end])


async def timed_stream(port: int, path: str, body: bytes, headers: dict, stats: Stats,
                       warmup_ns: int) -> None:
    try:
        reader, writer, status, _ = await _open(port, _request("POST", path, body, headers))
        if status != 200:
            stats.errors.append(f"status {status}")
            writer.close()
            return
        pending = b""
        async for chunk in _chunks(reader):
            now = time.monotonic_ns()
            pending += chunk
            *events, pending = pending.split(b"\n\n")
            for event in events:
                stamp = _stamp(event)
                if stamp is None:
                    continue
                stats.events += 1
                if stamp >= warmup_ns:
                    stats.latencies_ns.append(now - stamp)
        writer.close()
    except Exception as exc:
        stats.errors.append(repr(exc))


def cpu_seconds(root_pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each process in the trees under ``root_pids``."""
    return {pid: user + system for pid, (user, system) in process_tree_cpu(root_pids).items()}


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


async def latency_phase(args, service: Service, upstream: UpstreamProcess) -> dict:
    direct, relayed = Stats(), Stats()
    events = int(args.rate * args.duration)
    warmup_ns = time.monotonic_ns() + int(1.5e9)  # skip connection setup and the ramp
    tasks = []
    run = uuid.uuid4().hex[:8]
    for index in range(args.streams):
        for target, stats, port in ((service, relayed, service.port),
                                    (upstream, direct, upstream.port)):
            tag = f"{run}-{index}-{'s' if target is service else 'd'}"
            body = json.dumps({"stream": True, "model": "bench", "messages": [], "script": {
                "tag": tag, "events": events, "rate": args.rate, "pad": args.pad,
                "timestamps": True}}).encode()
            headers = {"X-Conversation-Id": f"bench-{tag}"} if target is service else {}
            tasks.append(timed_stream(port, "/v1/chat/completions", body, headers, stats,
                                      warmup_ns))
    random.shuffle(tasks)

    async def staggered(coroutine, delay):
        await asyncio.sleep(delay)
        await coroutine

    roots = {"service": [service.process.pid], "upstream": [upstream.process.pid],
             "bench client": [os.getpid()]}
    before = {name: cpu_seconds(pids) for name, pids in roots.items()}
    started = time.monotonic()
    await asyncio.gather(*(staggered(t, random.random()) for t in tasks))
    wall = time.monotonic() - started
    result = {"cpu_share_of_one_core": {}}
    for name, pids in roots.items():
        after = cpu_seconds(pids)
        if name == "bench client":  # itself only, not the service and upstream it started
            after = {pid: after[pid] for pid in pids}
        used = sum(after.values()) - sum(v for pid, v in before[name].items() if pid in after)
        result["cpu_share_of_one_core"][name] = round(used / wall, 2)
    for name, stats in (("direct", direct), ("service", relayed)):
        if stats.latencies_ns:
            result[name] = {"p50": _percentile(stats.latencies_ns, 0.5),
                            "p99": _percentile(stats.latencies_ns, 0.99),
                            "events": stats.events, "errors": len(stats.errors),
                            "first_errors": stats.errors[:3]}
        else:
            result[name] = {"events": 0, "errors": len(stats.errors),
                            "first_errors": stats.errors[:3]}
    expected = events * args.streams
    if "p50" in result["direct"] and "p50" in result["service"]:
        result["added_p50_ms"] = result["service"]["p50"] - result["direct"]["p50"]
        result["added_p99_ms"] = result["service"]["p99"] - result["direct"]["p99"]
    result["expected_events_per_side"] = expected
    return result


async def readers_phase(args, service: Service, upstream: UpstreamProcess) -> dict:
    tag = f"readers-{uuid.uuid4().hex[:8]}"
    conversation = f"readers-{tag}"
    body = json.dumps({"stream": True, "messages": [], "script": {
        "tag": tag, "events": args.reader_events, "rate": args.reader_rate, "pad": 100,
        "stall_before": 1.0}}).encode()
    producer = asyncio.ensure_future(_open(
        service.port, _request("POST", "/v1/chat/completions", body,
                               {"X-Conversation-Id": conversation})))
    errors: list[str] = []
    bodies: list[bytes] = []
    connected = 0

    async def reader() -> None:
        nonlocal connected
        try:
            reader_stream, writer, status, _ = await _open(
                service.port, _request("GET", f"/v1/stream/{conversation}?from=0"))
            if status != 200:
                errors.append(f"status {status}")
                return
            connected += 1
            bodies.append(b"".join([chunk async for chunk in _chunks(reader_stream)]))
            writer.close()
        except Exception as exc:
            errors.append(repr(exc))

    started = time.monotonic()
    await asyncio.sleep(0.2)  # the session exists (the upstream stalls 1 s first)
    await asyncio.gather(*(reader() for _ in range(args.readers)))
    elapsed = time.monotonic() - started
    _, producer_writer, status, _ = await producer
    producer_writer.close()
    if status != 200:
        errors.append(f"producer status {status}")
    record = httpx.get(f"{upstream.url}/_test/log", params={"tag": tag}).json()
    sent = base64.b64decode(record["sent"])
    exact = sum(1 for b in bodies if b.replace(b":\n\n", b"") == sent)
    return {"readers": args.readers, "connected_200": connected, "exact_bytes": exact,
            "errors": len(errors), "first_errors": errors[:3], "seconds": round(elapsed, 2),
            "session_bytes": len(sent)}


def replay_phase(args, service: Service, upstream: UpstreamProcess) -> dict:
    tag = f"replay-{uuid.uuid4().hex[:8]}"
    conversation = f"replay-{tag}"
    capacity = args.max_bytes
    pad = 1000
    events = capacity // (pad + 60) + 50  # a bit more than the ring holds
    body = {"stream": True, "messages": [], "script": {"tag": tag, "events": events,
                                                       "interval": 0, "pad": pad}}
    with httpx.Client(timeout=60) as client:
        answer = client.post(service.url + "/v1/chat/completions", json=body,
                             headers={"X-Conversation-Id": conversation})
        assert answer.status_code == 200, answer.status_code
        [info] = client.post(service.url + "/v1/streams/lookup",
                             json={"conversation_ids": [conversation]}).json()
        dropped = info["dropped_bytes"]
        rates = []
        for _ in range(args.replays):
            started = time.perf_counter()
            size = 0
            with client.stream("GET", f"{service.url}/v1/stream/{conversation}"
                                      f"?from={dropped}") as response:
                for chunk in response.iter_raw():
                    size += len(chunk)
            rates.append(size / (time.perf_counter() - started) / 1e6)
    return {"bytes": size, "from": dropped, "MB_per_s_median": round(statistics.median(rates), 1),
            "MB_per_s_best": round(max(rates), 1), "runs": len(rates)}


def cancel_phase(args, service: Service, upstream: UpstreamProcess) -> dict:
    """DELETE while the upstream is silent (mid-stream, or before its status line): the
    time until the upstream sees its connection closed, whichever worker produces."""
    import threading

    latencies = {"mid-stream": [], "prompt processing": []}
    delete_ms, after_204_ms = [], []
    with httpx.Client(timeout=30) as client:
        for attempt in range(args.cancels):
            kind = "mid-stream" if attempt % 2 == 0 else "prompt processing"
            tag = f"cancel-{uuid.uuid4().hex[:8]}"
            script = ({"tag": tag, "events": 5, "stall_at": 1, "stall": 60}
                      if kind == "mid-stream" else {"tag": tag, "stall_before": 60})

            def post(script=script, tag=tag):
                with contextlib.suppress(httpx.HTTPError), httpx.stream(
                        "POST", service.url + "/v1/chat/completions",
                        json={"stream": True, "messages": [], "script": script},
                        headers={"X-Conversation-Id": tag}, timeout=70) as response:
                    response.read()

            poster = threading.Thread(target=post, daemon=True)
            poster.start()

            def record(tag=tag):
                answer = client.get(f"{upstream.url}/_test/log", params={"tag": tag})
                return answer.json() if answer.status_code == 200 else None

            deadline = time.monotonic() + 10
            while not (r := record()) or (kind == "mid-stream" and r["events_sent"] < 1):
                if time.monotonic() > deadline:
                    raise RuntimeError("the upstream never got the request")
                time.sleep(0.01)
            time.sleep(0.3)  # silence
            with httpx.Client(timeout=10) as fresh:  # a new connection: any worker
                started = time.time()  # (after the client's setup, before it connects)
                fresh.delete(f"{service.url}/v1/stream/{tag}")
                delete_ms.append((time.time() - started) * 1000)
            while (closed := record()["closed_at"]) is None:
                if time.time() - started > 5:
                    raise RuntimeError("the upstream connection stayed open")
                time.sleep(0.002)
            latencies[kind].append((closed - started) * 1000)
            after_204_ms.append((closed - started) * 1000 - delete_ms[-1])
            poster.join(10)
    access = service.access()
    posts = [pid for pid, method, target, _ in access
             if method == "POST" and "chat" in target]
    deletes = [pid for pid, method, _, _ in access if method == "DELETE"]
    cross = sum(1 for p, d in zip(posts[-args.cancels:], deletes, strict=False) if p != d)
    return {kind: {"n": len(v), "p50_ms": round(statistics.median(v), 1),
                   "max_ms": round(max(v), 1)} for kind, v in latencies.items() if v} | {
        "cross_worker": f"{cross} of {len(deletes)} DELETEs ran on another worker",
        "delete_request_ms": {"p50": round(statistics.median(delete_ms), 1),
                              "max": round(max(delete_ms), 1)},
        "after_the_204_ms": {"p50": round(statistics.median(after_204_ms), 1),
                             "max": round(max(after_204_ms), 1)}}


def main() -> int:
    if "--llama" in sys.argv[1:]:
        from bench_llama import main as llama_main

        return llama_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s per stream")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per stream")
    parser.add_argument("--pad", type=int, default=150, help="padding bytes per event")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--reader-events", type=int, default=100)
    parser.add_argument("--reader-rate", type=float, default=20.0)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument("--max-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--skip", action="append", default=[],
                        choices=["latency", "readers", "replay", "cancel"])
    args = parser.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threads = max(64, (max(args.streams, args.readers) // args.workers) + 64)
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    results: dict = {"workers": args.workers, "threads_per_worker": threads,
                     "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as logs, UpstreamProcess() as upstream:
        service = Service(namespace, upstream.url, logs, workers=args.workers,
                          threads=threads, max_bytes=args.max_bytes, ping_interval=5)
        try:
            service.start()
            if "latency" not in args.skip:
                print(f"latency: {args.streams} streams x {args.rate:g} events/s x "
                      f"{args.duration:g} s, through the service and direct ...", flush=True)
                results["latency"] = asyncio.run(latency_phase(args, service, upstream))
                print(json.dumps(results["latency"], indent=2), flush=True)
            if "readers" not in args.skip:
                print(f"readers: {args.readers} concurrent readers of one session ...",
                      flush=True)
                results["readers"] = asyncio.run(readers_phase(args, service, upstream))
                print(json.dumps(results["readers"], indent=2), flush=True)
            if "replay" not in args.skip:
                print("replay: a full ring over HTTP ...", flush=True)
                results["replay"] = replay_phase(args, service, upstream)
                print(json.dumps(results["replay"], indent=2), flush=True)
            if "cancel" not in args.skip:
                print(f"cancel: {args.cancels} DELETEs while the upstream is silent ...",
                      flush=True)
                results["cancel"] = cancel_phase(args, service, upstream)
                print(json.dumps(results["cancel"], indent=2), flush=True)
        finally:
            service.stop()
            ShmStore(namespace).purge()
    print(f"\nload average before {results['loadavg_before'][0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (the upstream, the service and "
          f"this client share them; other load makes the tails meaningless)")
    latency = results.get("latency", {})
    if "added_p50_ms" in latency:
        print(f"service adds p50 {latency['added_p50_ms']:.2f} ms, p99 "
              f"{latency['added_p99_ms']:.2f} ms (direct p50 {latency['direct']['p50']:.2f} / "
              f"p99 {latency['direct']['p99']:.2f} ms; errors "
              f"{latency['service']['errors']} + {latency['direct']['errors']})")
    if "readers" in results:
        r = results["readers"]
        print(f"{r['connected_200']}/{r['readers']} readers got 200, {r['exact_bytes']} got the "
              f"exact bytes, {r['errors']} errors")
    if "replay" in results:
        print(f"replay of {results['replay']['bytes']} bytes: "
              f"{results['replay']['MB_per_s_median']} MB/s median, "
              f"{results['replay']['MB_per_s_best']} MB/s best")
    return 0


if __name__ == "__main__":
    sys.exit(main())
