#!/usr/bin/env python3
"""Scale benchmark (issue 12): thousands of concurrent streams through the event-driven
workers, side by side with the same load straight to the upstream, in one run.

It starts a cheap SSE upstream (raw asyncio in a process of its own: one ticker per event
rate writes the next event of every open stream, so thousands of streams cost it little), the
service (``gunicorn -c gunicorn.conf.py`` through ``tests/service.py``, ``--workers``
workers) and cheap load clients (raw asyncio sockets, each load in a process of its own),
and prints, each phase its own table:

1. scale: for each of ``--streams`` (200,500,1000,2000) concurrent streams x ``--rate``
   events/s x ``--events`` events, ramped over ``--ramp`` s: streams complete, replay
   identical (the caller's bytes == ``GET ?from=0``), TTFB p50/p99 (request sent -> status
   line and headers in) and the first event's p50/p99 (request sent -> first ``data:``
   chunk in), the longest answer (request sent -> last byte), straight to the
   upstream and through shmstream; CPU of every shmstream process (the gunicorn tree:
   master, workers, relays, supervisor) per relayed event as user/system, with the load
   generator's and the upstream's CPU beside it. The replay checks run after every stream
   ended, and their CPU is printed apart: it is reading, not relaying;
2. idle: ``--idle-readers`` readers (``--idle-sessions`` completions whose upstream is
   silent, each with its caller plus GET readers) held open for ``--idle-seconds``: pings
   received per reader per second and the total RSS of shmstream's processes;
3. fan-out: ``--fanout-readers`` readers of one session spread over the workers while the
   upstream sends ``--fanout-events`` events as fast as it can: events/s into the session
   (from the caller's first event to the store's completion stamp, which the relay sets
   after its last append: the producer's pace) and the caller's own events/s (the
   workers' pace too), beside the same without extra readers;
4. floor: what the chosen stack costs per event without shmstream, with the same upstream
   and load client (``--floor-streams`` streams): a bare Falcon ASGI app under gunicorn's
   asgi worker (``scripts/floor_app.py``, the HTTP worker hop) and aiohttp reading the
   upstream with nothing done with the bytes (the relay hop), beside shmstream's figure;
5. latency: ``--latency-streams`` streams x ``--latency-rate`` events/s, each event stamped
   with its send time: the delay added over connecting straight to the upstream (p50/p99).

gunicorn's asgi worker sends the status line and headers together with the first body
chunk, so through shmstream the TTFB is the first event's arrival; straight to the
upstream the headers come at once and the first event up to one ``1/--rate`` tick later
(one ticker drives every stream). The first-event columns compare like with like.

Small sizes prove it runs on a loaded machine; the defaults are the issue's figures:

    .venv/bin/python scripts/bench_scale.py --streams 50,100 --events 20 --idle-readers 200 \\
        --idle-sessions 20 --fanout-readers 20 --fanout-events 20000 --latency-streams 20
    .venv/bin/python scripts/bench_scale.py            # 200..2000 streams, 10,000 idle, ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from benchkit import process_tree_cpu  # noqa: E402

from shmstream.serve.relays import default_relay_count  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the service
    uvloop = None

DONE = b"data: [DONE]\n\n"
_STAMP = re.compile(rb'"t":(\d+)')


def run(coroutine):
    if uvloop is not None:
        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def raise_fd_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- the upstream ---------------------------------------------------------------------------


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, chunked SSE answers driven by the shared tickers."""

    def __init__(self, server: UpstreamServer):
        self.server = server
        self.buffer = b""
        self.transport = None
        self.busy = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport):
        self.transport = transport

    def pause_writing(self):
        self.can_write.clear()

    def resume_writing(self):
        self.can_write.set()

    def connection_lost(self, exc):
        self.server.forget(self)
        self.can_write.set()

    def data_received(self, data):
        self.buffer += data
        while not self.busy:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4: head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length:]
            self.answer(head.split(" ", 2), body)

    def answer(self, request_line: list[str], body: bytes) -> None:
        method, target = request_line[0], request_line[1] if len(request_line) > 1 else "/"
        if method != "POST":
            text = b'{"status": "ok"}' if target.startswith("/health") else b"{}"
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(text), text))
            return
        plan = json.loads(body or b"{}").get("bench", {})
        self.busy = True
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.server.start(self, plan)

    def send_event(self, index: int, stream) -> None:
        stamp = time.monotonic_ns() if stream["stamp"] else 0
        event = b'data: {"i":%d,"t":%d,"tag":"%s","p":"%s"}\n\n' % (
            index, stamp, stream["tag"], stream["pad"])
        self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))

    def finish(self) -> None:
        self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE))
        self.busy = False
        if self.buffer:
            self.data_received(b"")


class UpstreamServer:
    def __init__(self):
        self.groups: dict[float, dict[UpstreamProtocol, dict]] = {}
        self.tickers: dict[float, asyncio.Task] = {}

    def start(self, protocol: UpstreamProtocol, plan: dict) -> None:
        stream = {"events": int(plan.get("events", 100)), "sent": 0,
                  "tag": str(plan.get("tag", "x")).encode(),
                  "pad": b"x" * int(plan.get("pad", 0)), "stamp": bool(plan.get("stamp")),
                  "delay": float(plan.get("delay", 0))}
        if plan.get("silent"):
            return  # headers only: the session lives on pings until the client goes
        interval = float(plan.get("interval", 0.1))
        if interval <= 0:
            asyncio.get_running_loop().create_task(self._burst(protocol, stream))
            return
        self.groups.setdefault(interval, {})[protocol] = stream
        if interval not in self.tickers:
            self.tickers[interval] = asyncio.get_running_loop().create_task(
                self._tick(interval))

    async def _burst(self, protocol: UpstreamProtocol, stream: dict) -> None:
        await asyncio.sleep(stream["delay"])  # readers attach meanwhile
        for index in range(stream["events"]):
            if protocol.transport.is_closing():
                return
            protocol.send_event(index, stream)
            if index % 64 == 63:
                await protocol.can_write.wait()
                await asyncio.sleep(0)
        protocol.finish()

    async def _tick(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            group = self.groups.get(interval, {})
            for protocol, stream in list(group.items()):
                protocol.send_event(stream["sent"], stream)
                stream["sent"] += 1
                if stream["sent"] >= stream["events"]:
                    del group[protocol]
                    protocol.finish()

    def forget(self, protocol: UpstreamProtocol) -> None:
        for group in self.groups.values():
            group.pop(protocol, None)


async def serve_upstream(port: int) -> None:
    server = UpstreamServer()
    listener = await asyncio.get_running_loop().create_server(
        lambda: UpstreamProtocol(server), "127.0.0.1", port, backlog=4096)
    print(f"LISTENING {listener.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


# --- the load client -----------------------------------------------------------------------


class ClientProtocol(asyncio.Protocol):
    """One request; the answer's status and chunked body, decoded, with timings."""

    def __init__(self, request: bytes, keep: bool, on_ping=None):
        self.request = request
        self.keep = keep  # keep the decoded body (replay checks)
        self.on_ping = on_ping
        self.raw = b""
        self.head_done = False
        self.status = 0
        self.body = bytearray()
        self.size = 0
        self.sent_at = 0.0
        self.head_at = 0.0  # the status line and headers are in (TTFB)
        self.first_at = 0.0  # the first data event is in
        self.first_wall = 0.0
        self.stamps: list[int] = []
        self.tail = b""
        self.done = asyncio.get_running_loop().create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.sent_at = time.monotonic()
        transport.write(self.request)

    def data_received(self, data):
        self.raw += data
        if not self.head_done:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_at = time.monotonic()
            self.status = int(self.raw[9:12])
            self.head_done = True
            self.raw = self.raw[end + 4:]
        while True:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self.raw[:line_end].split(b";")[0], 16)
            if len(self.raw) < line_end + 2 + size + 2:
                return
            chunk = self.raw[line_end + 2: line_end + 2 + size]
            self.raw = self.raw[line_end + 4 + size:]
            if size == 0:
                self._finish()
                return
            self._chunk(chunk)

    def _chunk(self, chunk: bytes) -> None:
        if not self.first_at and b"data: " in chunk:
            self.first_at = time.monotonic()
            self.first_wall = time.time()  # beside the store's unix-time stamps
        self.size += len(chunk)
        if self.keep:
            self.body += chunk
        text = self.tail + chunk
        if self.on_ping is not None:
            self.on_ping(text.count(b":\n\n") - self.tail.count(b":\n\n"))
        now = time.monotonic_ns()
        for match in _STAMP.finditer(text):
            sent = int(match[1])
            if sent:
                self.stamps.append(now - sent)
        self.tail = text[-64:]

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(time.monotonic())
        self.transport.close()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(0.0)


def http_request(method: str, path: str, body: bytes = b"", headers: dict | None = None
                 ) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench", "Connection: close"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def open_call(port: int, request: bytes, keep: bool = False, on_ping=None):
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: ClientProtocol(request, keep, on_ping), "127.0.0.1", port)
    return protocol


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load_streams(options: dict, report=None) -> dict:
    """``streams`` completions, ramped; returns counts and timings (seconds). With
    ``replay``, every complete stream is then read again with ``GET ?from=0`` and compared,
    after all the completions ended and ``report`` was called, so the caller can measure
    the relaying's CPU apart from the check's."""
    port, via = options["port"], options["via"]
    count, events, interval = options["streams"], options["events"], options["interval"]
    run_id = uuid.uuid4().hex[:8]
    results = []

    async def one(index: int) -> None:
        await asyncio.sleep(options["ramp"] * index / max(1, count))
        conversation = f"bench-{run_id}-{index}"
        body = json.dumps({"stream": True, "messages": [], "bench": {
            "events": events, "interval": interval, "pad": options["pad"],
            "tag": conversation, "stamp": options["stamp"]}}).encode()
        headers = {"X-Conversation-Id": conversation} if via == "shmstream" else {}
        try:
            call = await open_call(port, http_request("POST", "/v1/chat/completions", body,
                                                      headers), keep=options["replay"])
            ended = await asyncio.wait_for(call.done, options["timeout"])
        except (OSError, TimeoutError) as exc:
            results.append({"ok": False, "error": type(exc).__name__})
            return
        complete = call.status == 200 and bytes(call.body[-len(DONE):]) == DONE \
            if options["replay"] else call.status == 200 and ended > 0
        results.append({"ok": complete, "conversation": conversation, "body": call.body,
                        "ttfb": call.head_at - call.sent_at if call.head_at else None,
                        "first": call.first_at - call.sent_at if call.first_at else None,
                        "took": (ended - call.sent_at) if ended else None,
                        "stamps": call.stamps})

    await asyncio.gather(*(one(i) for i in range(count)))
    if options["replay"]:
        if report is not None:
            report({"relayed": True})
        slots = asyncio.Semaphore(100)

        async def check(result: dict) -> None:
            async with slots:
                replay = await open_call(port, http_request(
                    "GET", f"/v1/stream/{result['conversation']}?from=0"), keep=True)
                await asyncio.wait_for(replay.done, options["timeout"])
                result["identical"] = bytes(replay.body) == bytes(result["body"])

        await asyncio.gather(*(check(r) for r in results if r["ok"]))
    ttfb = [r["ttfb"] for r in results if r.get("ttfb") is not None]
    first = [r["first"] for r in results if r.get("first") is not None]
    took = [r["took"] for r in results if r.get("took") is not None]
    delays = [d for r in results for d in r.get("stamps", [])]
    return {"streams": count, "complete": sum(1 for r in results if r["ok"]),
            "identical": sum(1 for r in results if r.get("identical")),
            "ttfb_p50": pct(ttfb, 0.5), "ttfb_p99": pct(ttfb, 0.99),
            "first_p50": pct(first, 0.5), "first_p99": pct(first, 0.99),
            "longest": max(took) if took else float("nan"),
            "delay_p50_ms": pct(delays, 0.5) / 1e6 if delays else None,
            "delay_p99_ms": pct(delays, 0.99) / 1e6 if delays else None,
            "errors": sorted({r["error"] for r in results if "error" in r})}


async def load_idle(options: dict) -> dict:
    """Silent sessions, each with its caller and GET readers, held open; pings counted."""
    port, sessions, readers = options["port"], options["sessions"], options["readers"]
    run_id = uuid.uuid4().hex[:8]
    pings = [0]
    calls = []

    def on_ping(count: int) -> None:
        pings[0] += count

    body = json.dumps({"stream": True, "messages": [], "bench": {"silent": True}}).encode()
    for index in range(sessions):
        conversation = f"idle-{run_id}-{index}"
        calls.append(await open_call(port, http_request(
            "POST", "/v1/chat/completions", body, {"X-Conversation-Id": conversation}),
            on_ping=on_ping))
    deadline = time.monotonic() + 60  # the sessions exist once their callers are answered
    while not all(c.head_done for c in calls) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    per_session = max(0, readers - sessions) // max(1, sessions)
    for index in range(sessions):
        for _ in range(per_session):
            calls.append(await open_call(port, http_request(
                "GET", f"/v1/stream/idle-{run_id}-{index}"), on_ping=on_ping))
    deadline = time.monotonic() + 60
    while sum(1 for c in calls if c.head_done) < len(calls) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    print(json.dumps({"held": sum(1 for c in calls if c.status == 200)}), flush=True)
    pings[0] = 0
    started = time.monotonic()
    await asyncio.sleep(options["seconds"])
    rate = pings[0] / (time.monotonic() - started) / max(1, len(calls))
    held = sum(1 for c in calls if c.status == 200 and not c.done.done())
    print(json.dumps({"readers": len(calls), "held": held, "pings_per_reader_s": rate}),
          flush=True)  # the measured window ends here, before the teardown
    for call in calls:
        call.transport.close()
    for index in range(sessions):  # stop the silent generations
        await open_call(port, http_request("DELETE", f"/v1/stream/idle-{run_id}-{index}"))
    return {"closed": True}


async def load_fanout(options: dict) -> dict:
    """One fast session with ``readers`` GET readers attached at once."""
    port, readers, events = options["port"], options["readers"], options["events"]
    conversation = f"fan-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"stream": True, "messages": [], "bench": {
        "events": events, "interval": 0, "pad": 0, "tag": "f", "delay": 1.0}}).encode()
    # The upstream answers at once and bursts a second later: the readers attach between.
    caller = await open_call(port, http_request("POST", "/v1/chat/completions", body,
                                                {"X-Conversation-Id": conversation}))
    while not caller.head_done:
        await asyncio.sleep(0.01)
    others = [await open_call(port, http_request("GET", f"/v1/stream/{conversation}?from=0"))
              for _ in range(readers)]
    ended = await asyncio.wait_for(caller.done, options["timeout"])
    ends = [await asyncio.wait_for(c.done, options["timeout"]) for c in others]
    complete = sum(1 for c in [caller, *others] if c.status == 200 and c.size == caller.size)
    seconds = ended - caller.first_at if caller.first_at and ended else float("nan")
    # The producer's own pace: from the first event (the caller has it within a
    # millisecond or so of its append) to the session's completion stamp, which the relay
    # sets right after the last append. The caller's pace is the workers' as well.
    # (The store's own stamp: the protocol's lookup rounds it to whole seconds.)
    from shmstream.shm.store import ShmStore

    store = ShmStore(options["namespace"])
    with store.get(conversation) as session:
        completed_at = session.info().completed_at
    appending = completed_at - caller.first_wall if caller.first_wall else float("nan")
    return {"readers": readers + 1, "complete": complete, "events": events,
            "into_session_per_s": events / appending if appending > 0 else float("nan"),
            "events_per_s": events / seconds if seconds else float("nan"),
            "slowest_reader_s": max(ends) - caller.first_at if ends else seconds}


async def load_aiohttp_reader(options: dict) -> dict:
    """The floor of a relay hop: aiohttp on this process's uvloop reading ``streams``
    ramped SSE answers straight from the upstream and dropping the bytes, as a relay's
    producers read them (``readany``). Returns its own CPU seconds."""
    import aiohttp

    port, count = options["port"], options["streams"]
    reads = []

    async def one(client, index: int) -> None:
        await asyncio.sleep(options["ramp"] * index / max(1, count))
        body = {"stream": True, "messages": [], "bench": {
            "events": options["events"], "interval": options["interval"],
            "pad": options["pad"], "tag": f"floor-{index}", "stamp": False}}
        async with client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                               json=body) as answer:
            read, content = 0, answer.content
            while await content.readany():
                read += 1
        reads.append(read)

    before = resource.getrusage(resource.RUSAGE_SELF)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        await asyncio.gather(*(one(client, i) for i in range(count)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"streams": count, "complete": len(reads), "reads": sum(reads),
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def load_main(options: dict) -> None:
    raise_fd_limit()
    kind = options.pop("kind")
    def report(line: dict) -> None:
        print(json.dumps(line), flush=True)

    if kind == "streams":
        report(run(load_streams(options, report)))
        return
    function = {"idle": load_idle, "fanout": load_fanout,
                "aiohttp_reader": load_aiohttp_reader}[kind]
    report(run(function(options)))


# --- the orchestrator --------------------------------------------------------------------


def cpu_times(root_pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of every process in the trees under ``root_pids``."""
    times = process_tree_cpu(root_pids).values()
    return sum(user for user, _ in times), sum(system for _, system in times)


def _role(pid: int, root_pid: int) -> str:
    if pid == root_pid:
        return "master"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read()
    except OSError:
        return "gone"
    if b"shmstream.serve.relays" in command:
        return "relays"
    if b"supervise" in command:
        return "supervisor"
    return "workers"


def cpu_by_role(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the tree under ``root_pid``, by kind of process."""
    roles: dict[str, float] = {}
    for pid, (user, system) in process_tree_cpu([root_pid]).items():
        role = _role(pid, root_pid)
        roles[role] = roles.get(role, 0.0) + user + system
    return roles


def tree_rss_bytes(root_pid: int) -> int:
    total = 0
    for pid in process_tree_cpu([root_pid]):
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Load:
    """A load client in a process of its own (its CPU is measured apart)."""

    def __init__(self, **options):
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "load", json.dumps(options)],
            stdout=subprocess.PIPE, text=True)

    def line(self) -> dict:
        text = self.process.stdout.readline()
        if not text:
            raise RuntimeError("the load client died")
        return json.loads(text)

    def result(self) -> dict:
        result = self.line()
        self.process.wait(30)
        return result

    def cpu(self) -> float:
        return sum(cpu_times([self.process.pid]))


def measured(load_options: dict, watched: dict[str, list[int]],
             roles_of: int | None = None) -> tuple[dict, dict]:
    """Run one load; its result and the CPU (user, system) of each watched tree + load.

    A streams load with replay checks reports when the relaying is over: the CPU is taken
    there (``cpu``, with ``roles``: each role's seconds of the ``roles_of`` tree), and the
    replay checks' own CPU after it (``cpu["replay"]``: the shmstream tree's seconds)."""
    before = {name: cpu_times(pids) for name, pids in watched.items()}
    roles_before = cpu_by_role(roles_of) if roles_of else {}
    load = Load(**load_options)
    try:
        load_cpu_before = cpu_times([load.process.pid])
        result = load.line()
        cpu = {name: tuple(a - b for a, b in zip(cpu_times(pids), before[name], strict=True))
               for name, pids in watched.items()}
        cpu["load"] = tuple(a - b for a, b in
                            zip(cpu_times([load.process.pid]), load_cpu_before, strict=True))
        if roles_of:
            roles_after = cpu_by_role(roles_of)
            cpu["roles"] = {role: roles_after[role] - roles_before.get(role, 0.0)
                            for role in sorted(roles_after) if role != "gone"}
        if result.get("relayed"):
            replay_before = cpu_times(watched["shmstream"])
            result = load.line()
            cpu["replay"] = tuple(a - b for a, b in zip(cpu_times(watched["shmstream"]),
                                                        replay_before, strict=True))
    finally:
        load.process.wait(60)
    return result, cpu


def start_upstream() -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "upstream"],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("LISTENING"):
        raise RuntimeError("the bench upstream did not start")
    return process, int(line.split()[1])


def fmt_ms(seconds) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:.0f} ms"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def floor(args, upstream_port: int, scale_cpu: dict[int, float]) -> None:
    """What the chosen stack costs per event without shmstream, with the same upstream and
    load: a bare Falcon ASGI app under gunicorn's asgi worker (scripts/floor_app.py) for
    the HTTP worker hop, and aiohttp reading the upstream for the relay hop."""
    from service import free_port, stop_gracefully

    count = args.floor_streams
    plan = {"pad": args.pad, "ramp": args.ramp, "events": args.events,
            "interval": 1 / args.rate, "timeout": 60 + 3 * args.events / args.rate}
    port = free_port()
    # Started in scripts/, where no gunicorn.conf.py is: shmstream's own (the repository
    # root's, gunicorn's default file) would add its hooks, relays and supervisor.
    app = subprocess.Popen(
        [os.path.join(ROOT, ".venv", "bin", "gunicorn"), "-k", "asgi", "-w",
         str(args.workers), "-b", f"127.0.0.1:{port}", "--log-level", "warning",
         "floor_app:app"], cwd=os.path.join(ROOT, "scripts"), start_new_session=True)
    try:
        # Ready when every worker is forked and the port accepts (workers accept once the
        # master listens, so a connection alone says nothing of the last worker).
        deadline = time.monotonic() + 60
        while len(process_tree_cpu([app.pid])) < args.workers + 1 or not _accepts(port):
            if app.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the floor app did not start its workers")
            time.sleep(0.1)
        result, cpu = measured({"kind": "streams", "port": port, "via": "direct",
                                "streams": count, "stamp": False, "replay": False, **plan},
                               {"floor": [app.pid]})
    finally:
        stop_gracefully(app)
    worker_floor = sum(cpu["floor"]) / max(1, result["complete"] * (args.events + 1))
    reader = Load(kind="aiohttp_reader", port=upstream_port, streams=count, **plan).result()
    relay_floor = reader["cpu"] / max(1, reader["complete"] * (args.events + 1))
    print(f"\n## floor: the stack without shmstream, {count} streams x {args.rate:g} "
          f"events/s x {args.events} events, the same upstream and load client")
    print("| hop | complete | CPU per event |")
    print("|---|---|---|")
    print(f"| HTTP worker: bare Falcon ASGI app under gunicorn's asgi worker ({args.workers} "
          f"workers), streaming from a per-process tick | {result['complete']}/{count} | "
          f"{worker_floor * 1e6:.1f} us |")
    print(f"| relay: aiohttp on uvloop reading the upstream, bytes dropped (one process) | "
          f"{reader['complete']}/{count} | {relay_floor * 1e6:.1f} us |")
    print(f"| the two hops' floor | | {(worker_floor + relay_floor) * 1e6:.1f} us |")
    if count in scale_cpu:
        print(f"| shmstream, {count} streams in the scale phase above | | "
              f"{scale_cpu[count] * 1e6:.1f} us |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--paths", default="direct,shmstream",
                        help="scale phase: which paths to run (direct,shmstream)")
    parser.add_argument("--relays", type=int, default=None,
                        help="relay processes (default: the service's own default)")
    parser.add_argument("--streams", default="200,500,1000,2000")
    parser.add_argument("--rate", type=float, default=10.0, help="events/s per stream")
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--pad", type=int, default=40, help="padding bytes per event")
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--idle-readers", type=int, default=10_000)
    parser.add_argument("--idle-sessions", type=int, default=1_000)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--fanout-readers", type=int, default=100)
    parser.add_argument("--fanout-events", type=int, default=200_000)
    parser.add_argument("--latency-streams", type=int, default=100)
    parser.add_argument("--latency-rate", type=float, default=100.0)
    parser.add_argument("--latency-events", type=int, default=500)
    parser.add_argument("--max-bytes", type=int, default=32 << 20,
                        help="SHMSTREAM_MAX_BYTES: the fan-out's whole burst fits, so its "
                        "readers are not lapped (rings grow with what they hold)")
    parser.add_argument("--access-log", action="store_true",
                        help="with gunicorn's access log (the service's default is none)")
    parser.add_argument("--floor-streams", type=int, default=2000)
    parser.add_argument("--phases", default="scale,idle,fanout,floor,latency")
    args = parser.parse_args()
    raise_fd_limit()  # inherited by gunicorn and the load clients
    from service import Service

    relays = args.relays or default_relay_count()
    upstream, upstream_port = start_upstream()
    namespace = f"bscale{os.getpid()}"
    log_dir = tempfile.mkdtemp(prefix="bench-scale-")
    service = Service(namespace, f"http://127.0.0.1:{upstream_port}", log_dir,
                      workers=args.workers, max_bytes=args.max_bytes, ping_interval=1.0,
                      relays=relays, access_log=args.access_log)
    phases = set(args.phases.split(","))
    scale_cpu: dict[int, float] = {}  # streams -> shmstream CPU seconds per relayed event
    try:
        service.start(timeout=60)
        watched = {"shmstream": [service.process.pid], "upstream": [upstream.pid]}
        timeout = 60 + 3 * args.events / args.rate
        common = {"kind": "streams", "pad": args.pad, "ramp": args.ramp, "timeout": timeout}
        if "scale" in phases:
            print(f"\n## {args.rate:g} events/s x {args.events} events per stream, "
                  f"{args.workers} workers, {relays} relays, ramp {args.ramp:g} s")
            print("| streams | path | complete | replay-identical | TTFB p50 / p99 "
                  "| first event p50 / p99 | longest "
                  "| shmstream CPU/event (user+sys) | load CPU | upstream CPU |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            by_process_lines: list[str] = []
            for count in [int(n) for n in args.streams.split(",")]:
                paths = (("direct", upstream_port), ("shmstream", service.port))
                for via, port in [path for path in paths if path[0] in args.paths]:
                    through = via == "shmstream"
                    result, cpu = measured({**common, "port": port, "via": via,
                                            "streams": count, "events": args.events,
                                            "interval": 1 / args.rate, "stamp": False,
                                            "replay": through}, watched,
                                           roles_of=service.process.pid if through else None)
                    relayed = result["complete"] * (args.events + 1)
                    user, system = cpu["shmstream"]
                    per_event = (f"{(user + system) / relayed * 1e6:.0f} us "
                                 f"({user / relayed * 1e6:.0f}+{system / relayed * 1e6:.0f})"
                                 if through and relayed else "-")
                    identical = result["identical"] if through else "-"
                    print(f"| {count} | {via} | {result['complete']}/{count} | {identical} | "
                          f"{fmt_ms(result['ttfb_p50'])} / {fmt_ms(result['ttfb_p99'])} | "
                          f"{fmt_ms(result['first_p50'])} / {fmt_ms(result['first_p99'])} | "
                          f"{result['longest']:.2f} s | {per_event} | "
                          f"{sum(cpu['load']):.2f} s | {sum(cpu['upstream']):.2f} s |"
                          + (f" errors {result['errors']}" if result["errors"] else ""),
                          flush=True)
                    if through and relayed:
                        scale_cpu[count] = (user + system) / relayed
                        by_role = ", ".join(f"{role} {seconds / relayed * 1e6:.0f} us"
                                            for role, seconds in cpu["roles"].items())
                        replay = sum(cpu.get("replay", (0.0, 0.0)))
                        checked = max(1, result["identical"])
                        by_process_lines.append(
                            f"- {count} streams, CPU per relayed event by process: {by_role}; "
                            f"the replay checks after it: {replay:.2f} s "
                            f"({replay / checked * 1e3:.2f} ms per GET ?from=0)")
            print("\n".join(by_process_lines), flush=True)
        if "idle" in phases:
            load = Load(kind="idle", port=service.port, sessions=args.idle_sessions,
                        readers=args.idle_readers, seconds=args.idle_seconds)
            held = load.line()
            rss = tree_rss_bytes(service.process.pid)
            cpu_before, started = cpu_times([service.process.pid]), time.monotonic()
            result = load.line()
            window = time.monotonic() - started
            user, system = (a - b for a, b in zip(cpu_times([service.process.pid]),
                                                  cpu_before, strict=True))
            load.result()
            print(f"\n## idle: {result['readers']} readers of {args.idle_sessions} silent "
                  f"sessions on {args.workers} workers")
            print(f"held {held['held']} (still open at the end: {result['held']}); pings "
                  f"{result['pings_per_reader_s']:.2f}/reader/s; shmstream RSS "
                  f"{rss / 2**20:.0f} MiB ({rss / max(1, result['readers']) / 1024:.1f} KiB "
                  f"per reader, shared pages counted per process); shmstream CPU while idle "
                  f"{(user + system) / window * 100:.0f}% of a core ({user / window * 100:.0f}"
                  f"% user + {system / window * 100:.0f}% system)")
        if "fanout" in phases:
            print(f"\n## fan-out: one session, upstream bursting {args.fanout_events} events")
            print("| readers | complete | events/s into the session (first event -> "
                  "completed) | the caller's events/s | slowest reader |")
            print("|---|---|---|---|---|")
            for readers in (0, args.fanout_readers):
                load = Load(kind="fanout", port=service.port, readers=readers,
                            namespace=namespace,
                            events=args.fanout_events, timeout=120)
                result = load.result()
                print(f"| {result['readers']} | {result['complete']} | "
                      f"{result['into_session_per_s']:,.0f} | {result['events_per_s']:,.0f} | "
                      f"{result['slowest_reader_s']:.2f} s |", flush=True)
        if "floor" in phases:
            floor(args, upstream_port, scale_cpu)
        if "latency" in phases:
            rows = {}
            for via, port in (("direct", upstream_port), ("shmstream", service.port)):
                rows[via], _ = measured({**common, "port": port, "via": via,
                                         "streams": args.latency_streams,
                                         "events": args.latency_events,
                                         "interval": 1 / args.latency_rate, "stamp": True,
                                         "replay": False, "ramp": 1.0}, watched)
            direct, through = rows["direct"], rows["shmstream"]
            print(f"\n## latency: {args.latency_streams} streams x {args.latency_rate:g} "
                  "events/s (upstream send -> client receive)")
            print(f"direct p50 {direct['delay_p50_ms']:.2f} ms p99 {direct['delay_p99_ms']:.2f}"
                  f" ms; through shmstream p50 {through['delay_p50_ms']:.2f} ms p99 "
                  f"{through['delay_p99_ms']:.2f} ms; added p50 "
                  f"{through['delay_p50_ms'] - direct['delay_p50_ms']:.2f} ms, p99 "
                  f"{through['delay_p99_ms'] - direct['delay_p99_ms']:.2f} ms")
    finally:
        service.stop()
        upstream.kill()
        upstream.wait(5)
        from shmstream.shm.store import ShmStore

        ShmStore(namespace).purge()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "upstream":
        raise_fd_limit()
        run(serve_upstream(0))
    elif len(sys.argv) > 2 and sys.argv[1] == "load":
        load_main(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
