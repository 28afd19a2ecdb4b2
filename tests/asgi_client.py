"""Driving an ASGI app in-process from synchronous tests, the way a server would.

Every call runs on one event loop in a background thread (the app's pooled upstream client
belongs to one loop), with the request target as sent (``raw_path`` percent-encoded, the
raw query string). :meth:`AsgiClient.open` returns a live :class:`Call` whose body chunks
the test reads one by one and whose client it can make disconnect (``http.disconnect``),
as a browser that closes the tab; :meth:`AsgiClient.request` collects a whole answer.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import queue
import threading
from dataclasses import dataclass
from urllib.parse import unquote

_END = object()


@dataclass
class Result:
    status_code: int
    headers: dict[str, str]  # lower-case names; repeated ones joined by ", "
    header_list: list[tuple[str, str]]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8")

    @property
    def json(self):
        return jsonlib.loads(self.content)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.header_list if k == name.lower()]


class Call:
    """One request in flight: ``status``/``headers`` once the answer started, then
    :meth:`next` chunk by chunk; :meth:`disconnect` makes its client leave."""

    def __init__(self, client: AsgiClient, scope: dict, body: bytes):
        self._client = client
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._started = threading.Event()
        self.finished = threading.Event()  # the app returned
        self.status = 0
        self.header_list: list[tuple[str, str]] = []
        self.error: BaseException | None = None
        self._gone: asyncio.Event | None = None
        self._future = asyncio.run_coroutine_threadsafe(self._run(scope, body), client.loop)

    @property
    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.header_list:
            out[name] = f"{out[name]}, {value}" if name in out else value
        return out

    async def _run(self, scope: dict, body: bytes) -> None:
        self._gone = asyncio.Event()
        pieces = list(body) if isinstance(body, list) else [body]

        async def receive():
            if pieces:
                piece = pieces.pop(0)
                return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
            await self._gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.header_list = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                                    for k, v in message.get("headers", [])]
                self._started.set()
            elif message["type"] == "http.response.body":
                if self._gone.is_set():
                    return  # a server drops what comes after the client left
                if message.get("body"):
                    self._chunks.put(bytes(message["body"]))
                if not message.get("more_body", False):
                    self._chunks.put(_END)

        try:
            await self._client.app(scope, receive, send)
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            self._chunks.put(_END)
            self._started.set()
            self.finished.set()

    def wait_started(self, timeout: float = 10.0) -> Call:
        assert self._started.wait(timeout), "the app did not start its answer"
        if self.error is not None and not self.status:
            raise self.error
        return self

    def next(self, timeout: float = 10.0) -> bytes:
        """The next body chunk; StopIteration at the end; AssertionError on timeout."""
        try:
            chunk = self._chunks.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no body chunk in time") from None
        if chunk is _END:
            self._chunks.put(_END)
            raise StopIteration
        return chunk

    def rest(self, timeout: float = 10.0) -> bytes:
        """Everything until the body ends."""
        parts = []
        while True:
            try:
                parts.append(self.next(timeout))
            except StopIteration:
                return b"".join(parts)

    def __iter__(self):
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    def disconnect(self) -> None:
        self._client.loop.call_soon_threadsafe(lambda: self._gone and self._gone.set())


class AsgiClient:
    def __init__(self, app):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="asgi-test-loop")
        self._thread.start()
        self._calls: list[Call] = []

    def scope(self, method: str, raw_uri: str, headers: dict | list | None = None,
              client: tuple | None = ("10.1.2.3", 40000)) -> dict:
        path, _, query = raw_uri.partition("?")
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        raw_headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                       for k, v in items]
        if not any(k == b"host" for k, _ in raw_headers):
            raw_headers.insert(0, (b"host", b"testserver"))
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
                "http_version": "1.1", "method": method.upper(), "scheme": "http",
                "path": unquote(path, encoding="latin-1"),
                "raw_path": path.encode("latin-1"), "query_string": query.encode("latin-1"),
                "root_path": "", "headers": raw_headers, "client": client,
                "server": ("127.0.0.1", 80)}

    def open(self, method: str, raw_uri: str, headers: dict | list | None = None,
             body: bytes = b"", json=None, content_length: bool = True, **scope) -> Call:
        headers = dict(headers or {}) if not isinstance(headers, list) else list(headers)
        if isinstance(body, str):
            body = body.encode()
        if json is not None:
            body = jsonlib.dumps(json).encode()
            if isinstance(headers, dict):
                headers.setdefault("content-type", "application/json")
        if body and content_length and isinstance(headers, dict) and isinstance(body, bytes):
            headers.setdefault("content-length", str(len(body)))
        full = self.scope(method, raw_uri, headers)
        full.update(scope)
        call = Call(self, full, body)
        self._calls.append(call)
        return call

    def request(self, method: str, raw_uri: str, headers=None, body: bytes = b"", json=None,
                timeout: float = 30.0, **scope) -> Result:
        call = self.open(method, raw_uri, headers, body, json, **scope).wait_started(timeout)
        content = call.rest(timeout)
        assert call.finished.wait(timeout)
        return Result(call.status, call.headers, call.header_list, content)

    # the falcon.testing names the tests use
    def simulate_get(self, path: str, query_string: str = "", **kwargs) -> Result:
        return self.simulate_request("GET", path, query_string, **kwargs)

    def simulate_post(self, path: str, query_string: str = "", **kwargs) -> Result:
        return self.simulate_request("POST", path, query_string, **kwargs)

    def simulate_delete(self, path: str, query_string: str = "", **kwargs) -> Result:
        return self.simulate_request("DELETE", path, query_string, **kwargs)

    def simulate_options(self, path: str, query_string: str = "", **kwargs) -> Result:
        return self.simulate_request("OPTIONS", path, query_string, **kwargs)

    def simulate_head(self, path: str, query_string: str = "", **kwargs) -> Result:
        return self.simulate_request("HEAD", path, query_string, **kwargs)

    def simulate_request(self, method: str, path: str, query_string: str = "", *,
                         headers=None, body: bytes = b"", json=None,
                         remote_addr: str | None = None, **scope) -> Result:
        uri = f"{path}?{query_string}" if query_string else path
        if remote_addr:
            scope["client"] = (remote_addr, 40000)
        return self.request(method, uri, headers=headers, body=body, json=json, **scope)

    def close(self) -> None:
        for call in self._calls:
            call.disconnect()
        for call in self._calls:
            call.finished.wait(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class InProcessService:
    """shmstream's app on ``store`` with a real :class:`LocalRelay` (its own upstream client,
    as a relay process has) and an :class:`AsgiClient` (``.client``)."""

    def __init__(self, store, settings, upstream, relay_upstream=None):
        from shmstream.http.app import create_app
        from shmstream.relay.client import HttpAsyncUpstream
        from shmstream.relay.h1client import H1Upstream
        from shmstream.relay.local import LocalRelay

        if relay_upstream is None:  # the relay's own client, as a relay process has
            relay_upstream = (H1Upstream(upstream.base_url)
                              if isinstance(upstream, HttpAsyncUpstream) else upstream)
        self.store = store
        self.settings = settings
        self.upstream = upstream
        self.relay = LocalRelay(store, relay_upstream, settings.ping_interval).start()
        self.app = create_app(store, settings, upstream, self.relay.client())
        self.client = AsgiClient(self.app)

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):  # the app's pooled client lives on its loop
            asyncio.run_coroutine_threadsafe(self.upstream.aclose(),
                                             self.client.loop).result(5)
        self.client.close()
        self.relay.stop()
