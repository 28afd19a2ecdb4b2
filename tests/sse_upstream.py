"""A scripted, slow SSE upstream for tests and benchmarks: a real HTTP/1.1 server (asyncio,
raw sockets, keep-alive, chunked bodies) that streams what the request body's ``script``
says and records what it sent and when its client hung up.

Run it as a process (``python tests/sse_upstream.py --port 0`` prints ``LISTENING <port>``)
or in a thread (:class:`InThreadUpstream`). The script, in the completion request's JSON body::

    {"stream": true, "script": {
        "tag": "abc",          # key of the record in GET /_test/log?tag=abc
        "events": 10,          # data events to send
        "interval": 0.01,      # seconds between events (or "rate": events per second)
        "stall_before": 0.0,   # seconds of silence before the status line (prompt processing)
        "stall_at": -1,        # after this many events ...
        "stall": 0.0,          # ... stay silent this long
        "status": 200,         # a non-2xx status answers at once with "error_body"
        "error_body": {...},
        "break_after": -1,     # after this many events drop the connection (no terminator)
        "pad": 0,              # bytes of padding in each event
        "timestamps": false,   # put time.monotonic_ns() of the send into each event as "t"
        "done": true}}         # end with data: [DONE]

Other routes: ``GET /health``; ``GET /_test/log?tag=`` (the record: request headers, the
body bytes sent (base64), when the client closed the connection early); anything else
echoes the request as JSON (``/_test/status/<code>`` answers with that status and a few
headers that test hop-by-hop filtering; ``/_test/drip?n=&interval=`` streams a plain body
slowly).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))


def event_bytes(index: int, tag: str, pad: int = 0, stamp: int | None = None) -> bytes:
    """The bytes of data event ``index`` (deterministic unless ``stamp`` is given)."""
    payload = {"i": index, "tag": tag, "choices": [{"delta": {"content": f" tok{index}"}}]}
    if stamp is not None:
        payload["t"] = stamp
    if pad:
        payload["pad"] = "x" * pad
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def expected_body(tag: str, events: int, pad: int = 0, done: bool = True) -> bytes:
    body = b"".join(event_bytes(i, tag, pad) for i in range(events))
    return body + (b"data: [DONE]\n\n" if done else b"")


class Record:
    def __init__(self, tag: str, headers: dict):
        self.tag = tag
        self.headers = headers
        self.started_at = time.time()
        self.answered_at: float | None = None
        self.closed_at: float | None = None  # the client went before the body ended
        self.finished = False
        self.sent = bytearray()
        self.events_sent = 0

    def as_dict(self) -> dict:
        return {"tag": self.tag, "headers": self.headers, "started_at": self.started_at,
                "answered_at": self.answered_at, "closed_at": self.closed_at,
                "finished": self.finished, "events_sent": self.events_sent,
                "sent": base64.b64encode(bytes(self.sent)).decode()}


class ClientGone(Exception):
    pass


class Connection:
    """One client connection: a reader task fills a buffer and notices EOF at any time."""

    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.eof = asyncio.Event()
        self.more = asyncio.Event()
        self.eof_at: float | None = None

    async def pump(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.buffer += data
                self.more.set()
        except (ConnectionError, OSError):
            pass
        self.eof_at = time.time()
        self.eof.set()
        self.more.set()

    async def read_until(self, marker: bytes) -> bytes | None:
        while marker not in self.buffer:
            if self.eof.is_set():
                return None
            self.more.clear()
            await self.more.wait()
        index = self.buffer.index(marker) + len(marker)
        data = bytes(self.buffer[:index])
        del self.buffer[:index]
        return data

    async def read_exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if self.eof.is_set():
                return None
            self.more.clear()
            await self.more.wait()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def write(self, data: bytes) -> None:
        if self.eof.is_set():
            raise ClientGone()
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            raise ClientGone() from None

    async def sleep(self, seconds: float) -> None:
        """Sleep, but raise ClientGone as soon as the client hangs up."""
        if seconds <= 0:
            if self.eof.is_set():
                raise ClientGone()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.eof.wait(), seconds)
        if self.eof.is_set():
            raise ClientGone()


class Server:
    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        conn = Connection(self, reader, writer)
        pump = asyncio.create_task(conn.pump())
        try:
            while True:
                head = await conn.read_until(b"\r\n\r\n")
                if head is None:
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        name = name.strip().lower()
                        value = value.strip()
                        headers[name] = f"{headers[name]}, {value}" if name in headers else value
                body = await self._read_body(conn, headers)
                if body is None:
                    break
                keep = await self.respond(conn, method, target, headers, body)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except ClientGone:
            pass
        except Exception as exc:  # a bug in the test server: say so loudly
            print(f"sse_upstream: error: {exc!r}", file=sys.stderr, flush=True)
        finally:
            pump.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_body(self, conn: Connection, headers: dict) -> bytes | None:
        if "content-length" in headers:
            return await conn.read_exactly(int(headers["content-length"]))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                line = await conn.read_until(b"\r\n")
                if line is None:
                    return None
                size = int(line.split(b";")[0].strip(), 16)
                chunk = await conn.read_exactly(size + 2)
                if chunk is None:
                    return None
                if size == 0:
                    return b"".join(parts)
                parts.append(chunk[:-2])
        return b""

    async def send_head(self, conn: Connection, status: int, headers: list[tuple[str, str]],
                        chunked: bool) -> None:
        lines = [f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        await conn.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def send_json(self, conn: Connection, status: int, obj, extra=()) -> bool:
        data = json.dumps(obj).encode()
        await self.send_head(conn, status, [("Content-Type", "application/json"),
                                            ("Content-Length", str(len(data))), *extra],
                             chunked=False)
        await conn.write(data)
        return True

    async def respond(self, conn: Connection, method: str, target: str, headers: dict,
                      body: bytes) -> bool:
        url = urlsplit(target)
        path = url.path
        query = parse_qs(url.query)
        if path in ("/health", "/v1/health"):
            return await self.send_json(conn, 200, {"status": "ok"})
        if path == "/_test/log":
            tag = query.get("tag", [""])[0]
            record = self.records.get(tag)
            if record is None:
                return await self.send_json(conn, 404, {"error": "no such tag"})
            return await self.send_json(conn, 200, record.as_dict())
        if path.startswith("/_test/status/"):
            status = int(path.rsplit("/", 1)[1])
            extra = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Hop", "secret"),
                     ("Connection", "X-Hop"), ("Keep-Alive", "timeout=5"),
                     ("X-Upstream", "yes")]
            if method == "HEAD" or status in (204, 304):
                await self.send_head(conn, status, [*extra, ("Content-Length", "0")]
                                     if status not in (204, 304) else extra, chunked=False)
                return True
            return await self.send_json(conn, status, {"status": status}, extra)
        if path == "/_test/drip":
            count = int(query.get("n", ["5"])[0])
            interval = float(query.get("interval", ["0.05"])[0])
            await self.send_head(conn, 200, [("Content-Type", "text/plain")], chunked=True)
            for index in range(count):
                await conn.sleep(interval)
                piece = f"drip {index}\n".encode()
                await conn.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await conn.write(b"0\r\n\r\n")
            return True
        try:
            request = json.loads(body) if body else {}
        except ValueError:
            request = None
        if method == "POST" and isinstance(request, dict) and "script" in request:
            return await self.scripted(conn, headers, request)
        echo = {"method": method, "target": target, "headers": headers,
                "body_length": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
        if method == "HEAD":
            await self.send_head(conn, 200, [("Content-Type", "application/json"),
                                             ("Content-Length", "123")], chunked=False)
            return True
        return await self.send_json(conn, 200, echo)

    async def scripted(self, conn: Connection, headers: dict, request: dict) -> bool:
        script = request.get("script") or {}
        tag = str(script.get("tag") or uuid.uuid4().hex)
        record = self.records[tag] = Record(tag, headers)
        events = int(script.get("events", 10))
        interval = float(script.get("interval", 0.01))
        if script.get("rate"):
            interval = 1.0 / float(script["rate"])
        pad = int(script.get("pad", 0))
        stamps = bool(script.get("timestamps", False))
        stall_at, stall = int(script.get("stall_at", -1)), float(script.get("stall", 0))
        break_after = int(script.get("break_after", -1))
        try:
            await conn.sleep(float(script.get("stall_before", 0)))
            status = int(script.get("status", 200))
            record.answered_at = time.time()
            if status >= 300:
                error = script.get("error_body", {"error": {"code": status, "message": "boom",
                                                            "type": "server_error"}})
                await self.send_json(conn, status, error)
                record.finished = True
                return True
            if request.get("stream") is not True:
                text = "".join(f" tok{i}" for i in range(events))
                record.finished = True
                return await self.send_json(conn, 200, {"tag": tag, "choices": [
                    {"message": {"role": "assistant", "content": text}}]})
            await self.send_head(conn, 200, [("Content-Type", "text/event-stream"),
                                             ("Cache-Control", "no-cache")], chunked=True)
            start = time.monotonic()
            for index in range(events):
                if index == break_after:
                    conn.writer.transport.abort()  # no terminating chunk: a broken stream
                    return False
                if index == stall_at:
                    await conn.sleep(stall)
                    start += stall
                await conn.sleep(start + index * interval - time.monotonic())
                data = event_bytes(index, tag, pad, time.monotonic_ns() if stamps else None)
                await conn.write(b"%x\r\n%s\r\n" % (len(data), data))
                record.sent += data
                record.events_sent += 1
            if script.get("done", True):
                data = b"data: [DONE]\n\n"
                await conn.write(b"%x\r\n%s\r\n" % (len(data), data))
                record.sent += data
            await conn.write(b"0\r\n\r\n")
            record.finished = True
            return True
        except ClientGone:
            record.closed_at = conn.eof_at or time.time()
            raise


async def _serve(host: str, port: int, ready) -> None:
    server = Server()
    listener = await asyncio.start_server(server.handle, host, port, backlog=1024)
    ready(listener.sockets[0].getsockname()[1], listener, server)
    async with listener:
        await listener.serve_forever()


class InThreadUpstream:
    """The server on a free port in a daemon thread (``stop()`` ends it)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def ready(port, listener, server):
            self.port, self._listener, self.server = port, listener, server
            started.set()

        def run():
            asyncio.set_event_loop(self._loop)
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(_serve(host, 0, ready))

        self._thread = threading.Thread(target=run, name="sse-upstream", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("sse upstream did not start")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def record(self, tag: str) -> Record | None:
        return self.server.records.get(tag)

    def stop(self) -> None:
        def shut():
            self._listener.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        self._loop.call_soon_threadsafe(shut)
        self._thread.join(5)


class UpstreamProcess:
    """The server as a child process (a context manager that always stops it)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> UpstreamProcess:
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "sse_upstream.py"), "--host", self.host,
             "--port", "0"], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"sse upstream did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    def ready(port, listener, server):
        print(f"LISTENING {port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, ready))


if __name__ == "__main__":
    main()
