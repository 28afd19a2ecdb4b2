#!/usr/bin/env python3
"""Benchmark of one relay process: CPU per relayed event with S concurrent streams.

Starts the scripted SSE upstream (``tests/sse_upstream.py``) and one real relay process
(:class:`shmstream.serve.relays.RelayPool`, as the gunicorn master does), hands S streamed
completions to it through the HTTP workers' client (:class:`RelayClient`), waits until every
session ended, and reports the relay's CPU time (``/proc/<pid>/stat`` utime + stime) per
event appended, the sessions' states, and whether every session holds exactly the
upstream's bytes. The cancel path is measured too: time from a cancel (in this process) to
the upstream seeing its client go.

    .venv/bin/python scripts/bench_relay.py                        # 1000 x 20 events/s, 10 s
    .venv/bin/python scripts/bench_relay.py --streams 50 --duration 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import httpx  # noqa: E402
from sse_upstream import UpstreamProcess, expected_body  # noqa: E402

from shmstream.config import Settings  # noqa: E402
from shmstream.relay.handoff import RelayClient, RelayRequest  # noqa: E402
from shmstream.serve.relays import RelayPool  # noqa: E402
from shmstream.shm.store import ShmStore  # noqa: E402
from shmstream.store.states import State  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
PING = b":\n\n"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def request(conversation_id: str, script: dict) -> RelayRequest:
    body = json.dumps({"stream": True, "script": script}).encode()
    return RelayRequest(conversation_id, "POST", "/v1/chat/completions",
                        [("content-type", "application/json")], body)


async def hand_off_all(client: RelayClient, requests: list[RelayRequest]) -> list[float]:
    """Submit every request; the seconds each took until the upstream's status line."""
    async def one(item: RelayRequest) -> float:
        started = time.monotonic()
        ticket = await client.submit(item)
        answer = await ticket.answer()
        assert answer.status == 200, answer
        return time.monotonic() - started
    return await asyncio.gather(*(one(item) for item in requests))


def wait_all_ended(store: ShmStore, ids: list[str], timeout: float) -> dict[str, State]:
    deadline = time.monotonic() + timeout
    states: dict[str, State] = {}
    while time.monotonic() < deadline:
        states = {}
        for conversation_id in ids:
            session = store.get(conversation_id)
            if session is not None:
                with session:
                    states[conversation_id] = session.info().state
        if len(states) == len(ids) and all(s.is_terminal for s in states.values()):
            break
        time.sleep(0.2)
    return states


def measure_cancel(client: RelayClient, store: ShmStore, upstream, rounds: int) -> list[float]:
    latencies = []
    for index in range(rounds):
        tag = f"cancel-{uuid.uuid4().hex[:8]}"
        conversation_id = f"bench-cancel-{index}"
        asyncio.run(hand_off_all(client, [request(conversation_id, {
            "tag": tag, "events": 5, "stall_at": 1, "stall": 60})]))
        time.sleep(0.2)  # the upstream is silent now
        cancelled = time.time()
        store.evict_and_cancel(conversation_id)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            record = httpx.get(upstream.url + "/_test/log", params={"tag": tag}).json()
            if record.get("closed_at"):
                latencies.append(record["closed_at"] - cancelled)
                break
            time.sleep(0.005)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="events/s per stream")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per stream")
    parser.add_argument("--pad", type=int, default=150, help="padding bytes per event")
    parser.add_argument("--cancels", type=int, default=10)
    args = parser.parse_args()

    namespace = f"bench{os.getpid()}"
    settings = Settings(namespace=namespace, max_bytes=256 * 1024, ping_interval=1.0)
    store = ShmStore(namespace, capacity=settings.max_bytes)
    events = max(1, int(args.rate * args.duration))
    with UpstreamProcess() as upstream:
        settings = Settings(**{**settings.__dict__, "upstream": upstream.url})
        pool = RelayPool(settings, store.abort_producers, count=1)
        pool.start()
        try:
            (child,) = pool.children
            child.wait_ready(30)
            client = RelayClient(pool.socket_path, submit_timeout=60)
            tags = [f"s{index}-{uuid.uuid4().hex[:6]}" for index in range(args.streams)]
            ids = [f"bench-{tag}" for tag in tags]
            requests = [request(cid, {"tag": tag, "events": events, "rate": args.rate,
                                      "pad": args.pad}) for cid, tag in zip(ids, tags, strict=True)]
            cpu_before = cpu_seconds(child.pid)
            started = time.monotonic()
            answered = asyncio.run(hand_off_all(client, requests))
            states = wait_all_ended(store, ids, timeout=args.duration * 3 + 60)
            wall = time.monotonic() - started
            cpu = cpu_seconds(child.pid) - cpu_before
            exact = 0
            for cid, tag in zip(ids, tags, strict=True):
                session = store.get(cid)
                if session is None:
                    continue
                with session:
                    data = b"".join(session.read(0)).replace(PING, b"")
                exact += data == expected_body(tag, events, args.pad)
            total_events = args.streams * (events + 1)  # + [DONE]
            done = sum(1 for s in states.values() if s is State.DONE)
            print(f"relay: {args.streams} streams x {events} events at {args.rate:g}/s, "
                  f"pad {args.pad} B, wall {wall:.1f} s")
            print(f"  time to the status line: median {statistics.median(answered) * 1e3:.1f} ms"
                  f", max {max(answered) * 1e3:.1f} ms")
            print(f"  relay CPU {cpu:.2f} s = {cpu / total_events * 1e6:.1f} us per event "
                  f"({total_events} events), {cpu / wall * 100:.0f}% of one core")
            print(f"  sessions done {done}/{args.streams}, byte-exact {exact}/{args.streams}")
            if args.cancels:
                latencies = measure_cancel(client, store, upstream, args.cancels)
                if latencies:
                    print(f"  cancel -> upstream closed: median "
                          f"{statistics.median(latencies) * 1e3:.0f} ms, max "
                          f"{max(latencies) * 1e3:.0f} ms ({len(latencies)} rounds)")
            return 0 if done == exact == args.streams else 1
        finally:
            pool.stop(timeout=10)
            store.purge()


if __name__ == "__main__":
    sys.exit(main())
