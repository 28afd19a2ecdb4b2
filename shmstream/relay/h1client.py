"""The relays' upstream client: HTTP/1.1 on an asyncio Protocol, parsed by httptools, the
body pushed into the producer in the very step its bytes arrive.

Why a client of its own: a relay reads every token of every answer, one small chunk at a
time, and that read is its hot path. Every client library hands a chunk to a reading task:
the protocol feeds a buffer, wakes the task, the task takes the chunk (a future, a task
step and a few layers per token). Here the parser's body callback calls the producer's
``append`` directly (:meth:`H1Response.pump`), so a token costs a ``data_received``, a C
parse and an append. Measured with ``scripts/bench_upstream_client.py`` (200 streams x 100
events, side by side in one run, uvloop): aiohttp 11.3 us of CPU per chunk, httptools in a
protocol 6.0 us; httpx 49 us. The HTTP workers' proxy keeps httpx (it streams request
bodies both ways and is not per-token).

What it speaks, and what not:

- ``http`` and ``https`` (the system's CA store, plus certifi's bundle when installed), a
  base URL's path as a prefix, its ``user:password`` as Basic auth;
- bodies framed by Content-Length, chunked or by the connection's end; 1xx answers
  skipped; gzip and deflate decoded (the relay asks for ``identity``: an upstream that
  compresses anyway is still read right), any other Content-Encoding is an error;
- a keep-alive pool per relay: a connection read to its end goes back to it and is closed
  after ``keepalive`` idle seconds; a pooled connection the server closed meanwhile is
  retried once on a new one, and only if no byte of an answer came on it;
- no redirects followed (the caller gets the 3xx, as before), no proxies, no HTTP/2.

Cancelling the task that awaits :meth:`H1Upstream.open` or :meth:`H1Response.pump`, then
:meth:`H1Response.aclose`, closes that request's connection (a body not read to its end is
never pooled), so the upstream sees its client go and stops.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable

import httptools

from shmstream.relay.client import (
    AsyncUpstream,
    AsyncUpstreamRequest,
    AsyncUpstreamResponse,
    make_async_upstream,
)
from shmstream.relay.upstream import UpstreamError

CONNECT_TIMEOUT = 10.0  # seconds for TCP (and TLS) to be up
KEEPALIVE_SECONDS = 30.0  # an idle pooled connection is closed after this
MAX_HEAD = 1024 * 1024  # bytes of status line and headers, at most
_DECODED = {"gzip": 32 + zlib.MAX_WBITS, "x-gzip": 32 + zlib.MAX_WBITS,
            "deflate": 32 + zlib.MAX_WBITS}  # 32+: zlib or gzip wrapper, told by its header
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_UNSAFE = re.compile(r"[ \r\n]")


def _ssl_context() -> ssl.SSLContext:
    """The system's CA store, plus certifi's bundle when it is installed (httpx's own)."""
    context = ssl.create_default_context()
    with contextlib.suppress(ImportError, OSError):
        import certifi

        context.load_verify_locations(certifi.where())
    return context


class _Stale(Exception):
    """A pooled connection was closed by the server before any byte of an answer."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to the upstream, one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.expiry: asyncio.TimerHandle | None = None  # while idle in the pool
        self.pool: dict[_Connection, None] | None = None  # the pool it idles in
        self._start()

    def _start(self) -> None:
        """Fresh state for the next request's answer."""
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[str, str]] = []
        self.head_done: asyncio.Future = self.loop.create_future()
        self.complete = False  # the answer's body is all in
        self.keep_alive = False
        self.error: BaseException | None = None
        self.spoiled = False  # bytes beyond the answer, or a body left unread: never pool
        self._got_bytes = False
        self._head_bytes = 0
        self._framed_by_close = False
        self._decoder = None
        self._buffer: list[bytes] = []  # body bytes that came while nothing consumed them
        self._pending: list[bytes] = []  # the body parsed from the bytes being fed
        self._waiter: asyncio.Future | None = None
        self._sink: Callable[[bytes], bool] | None = None
        self._on_end: Callable[[], None] | None = None

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.complete or self.error is not None:
            # Nothing may come on a connection between answers (an idle one's "408" before
            # its server closes it): never reuse it.
            self.spoiled = True
            if self.pool is not None:
                self.close()
            return
        self._got_bytes = True
        if not self.head_done.done():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(UpstreamError(f"upstream sent over {MAX_HEAD} bytes of headers"))
                return
        error = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            error = UpstreamError("upstream switched protocols")
        except httptools.HttpParserError as exc:
            if self.error is None:  # else a callback failed and said why
                error = UpstreamError(f"upstream sent an invalid answer: {exc}")
        self._flush()  # what came before a parse error is the upstream's too
        if error is not None:
            self._fail(error)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost says what it meant

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._leave_pool()
        if self.complete or self.error is not None:
            return
        if not self.head_done.done():
            if not self._got_bytes:
                self._fail(_Stale())
            else:
                self._fail(UpstreamError("upstream closed the connection inside its headers"))
        elif self._framed_by_close:
            self._finish_body()  # the connection's end is the body's end
        else:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"upstream closed the connection in the middle of the "
                                     f"answer{reason}"))

    # --- httptools' callbacks -----------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self.reason += status  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # 1xx: informational, the answer follows (see on_message_complete)
        self.status = status
        chunked = length = False
        encoding = ""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "transfer-encoding":
                chunked = chunked or "chunked" in value.lower()
            elif lowered == "content-length":
                length = True
            elif lowered == "content-encoding":
                encoding = value.strip().lower()
        self._framed_by_close = not chunked and not length and status not in (204, 304)
        if encoding not in ("", "identity"):
            wbits = _DECODED.get(encoding)
            if wbits is None:
                self._fail(UpstreamError(f"upstream answered with Content-Encoding "
                                         f"{encoding!r}, which the relay cannot decode"))
                return
            self._decoder = zlib.decompressobj(wbits)
        self.head_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._fail(UpstreamError(f"upstream sent a body that does not decode: {exc}"))
                return
            if not body:
                return
        # One delivery per read, not per HTTP chunk: an upstream bursting many events
        # into one read becomes one append (one ring, one poll per reader), as a reading
        # task would have taken them.
        self._pending.append(body)

    def on_message_complete(self) -> None:
        if not self.head_done.done() and self.error is None:
            # The end of a 1xx answer: the real one comes next, on the same parser.
            self.reason = b""
            self.headers = []
            return
        self.keep_alive = self.parser.should_keep_alive()
        self._finish_body()

    # --- the body's way out -------------------------------------------------------------
    def _flush(self) -> None:
        pending = self._pending
        if pending:
            self._pending = []
            self._deliver(pending[0] if len(pending) == 1 else b"".join(pending))

    def _deliver(self, body: bytes) -> None:
        sink = self._sink
        if sink is None:
            self._buffer.append(body)
            self._wake()
            return
        try:
            more = sink(body)
        except BaseException as exc:  # the consumer's (a store gone): end the pump with it
            self._fail(exc)
            return
        if not more:
            self._sink = self._on_end = None
            self.spoiled = True  # the rest is not read: the connection cannot be pooled
            self._wake()

    def _finish_body(self) -> None:
        self._flush()
        if self._decoder is not None:
            tail, self._decoder = self._decoder.flush(), None
            if tail:
                self._deliver(tail)
        if self.error is not None:
            return
        self.complete = True
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()  # in this step: nothing runs between the last byte and the end
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not self.head_done.done():
            self.head_done.set_exception(exc)
            self.head_done.exception()  # retrieved: open() raises its own
        self._sink = self._on_end = None
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _leave_pool(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.pool is not None:
            self.pool.pop(self, None)
            self.pool = None

    def close(self) -> None:
        self.closed = True
        self._leave_pool()
        if self.transport is not None:
            self.transport.close()


class H1Response(AsyncUpstreamResponse):
    def __init__(self, connection: _Connection, upstream: H1Upstream):
        self._connection: _Connection | None = connection
        self._upstream = upstream
        self.status = connection.status
        self.reason = connection.reason.decode("latin-1").strip()
        self.headers = connection.headers

    async def pump(self, on_chunk: Callable[[bytes], bool], on_end: Callable[[], None]
                   ) -> None:
        connection = self._connection
        if connection is None:
            raise UpstreamError("upstream response already closed")
        buffered, connection._buffer = connection._buffer, []
        for chunk in buffered:
            if not on_chunk(chunk):
                connection.spoiled = True
                return
        if connection.error is None and not connection.complete:
            connection._sink, connection._on_end = on_chunk, on_end
            try:
                while connection._sink is not None and connection.error is None \
                        and not connection.complete:
                    await connection.wait()
            finally:
                connection._sink = connection._on_end = None
            if connection.error is None:
                return  # ended (on_end was called in that step) or stopped by on_chunk
        if connection.error is not None:
            raise connection.error
        on_end()  # it was all in before the pump started

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        while True:
            if connection._buffer:
                chunks, connection._buffer = connection._buffer, []
                for chunk in chunks:
                    yield chunk
                continue
            if connection.error is not None:
                raise connection.error
            if connection.complete:
                return
            await connection.wait()

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.complete and connection.keep_alive and not connection.spoiled \
                and not connection.closed and not connection._buffer:
            self._upstream._release(connection)
        else:
            connection.close()  # cut short: the upstream sees its client go and stops


class H1Upstream(AsyncUpstream):
    """An OpenAI-compatible server over HTTP(S), for relay processes (one per process;
    its pool belongs to the event loop that first uses it)."""

    def __init__(self, base_url: str, connect_timeout: float = CONNECT_TIMEOUT,
                 keepalive: float = KEEPALIVE_SECONDS,
                 ssl_context: ssl.SSLContext | None = None):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL {base_url!r} is not http:// or https:// with a host")
        self.base_url = base_url.rstrip("/")
        self.description = f"http upstream {self.base_url}"
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        secure = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if secure else 80)
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.rpartition("@")[2]
        self._basic = None
        if parts.username is not None:
            userinfo = (urllib.parse.unquote(parts.username) + ":"
                        + urllib.parse.unquote(parts.password or ""))
            self._basic = "Basic " + base64.b64encode(userinfo.encode()).decode()
        # loading the CA store takes ~100 ms: once
        self._ssl = (ssl_context or _ssl_context()) if secure else None
        # Idle connections, oldest first (a dict: a connection the server closes leaves it
        # at once, wherever it sits).
        self._idle: dict[_Connection, None] = {}

    def _head(self, request: AsyncUpstreamRequest) -> bytes:
        if _UNSAFE.search(request.method + request.target):
            raise UpstreamError("the request line for the upstream holds a space or a "
                                "line break")
        lines = [f"{request.method} {self._prefix}{request.target} HTTP/1.1",
                 f"Host: {self._host_header}"]
        authorized = False
        for name, value in request.headers:
            lowered = name.lower()
            if lowered in _FRAMING:
                continue  # ours to write: the body is re-framed here
            authorized = authorized or lowered == "authorization"
            lines.append(f"{name}: {value}")
        if self._basic is not None and not authorized:
            lines.append(f"Authorization: {self._basic}")
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(request.body)}")
        head = "\r\n".join(lines)
        # Names and values came through an HTTP parser already; a line break in one (a
        # caller's own client code) would smuggle a header or a request.
        if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
            raise UpstreamError("a header for the upstream holds a line break")
        try:
            return (head + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise UpstreamError("a header for the upstream is not latin-1 text") from None

    async def open(self, request: AsyncUpstreamRequest) -> H1Response:
        data = self._head(request) + request.body
        for _ in range(2):
            connection = self._take_idle()
            reused = connection is not None
            if connection is None:
                connection = await self._connect()
            connection.send(data)
            try:
                await connection.head_done
            except _Stale:
                connection.close()
                if reused:
                    continue  # the server had closed it while it was idle: once more
                raise UpstreamError("upstream closed the connection without an answer"
                                    ) from None
            except BaseException:
                connection.close()
                raise
            return H1Response(connection, self)
        raise UpstreamError("upstream closed the connection without an answer")

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None)
        except TimeoutError:
            raise UpstreamError(f"upstream ConnectTimeout: {self._host}:{self._port} did not "
                                f"answer within {self.connect_timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"upstream ConnectError: {exc}") from None
        return connection

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection, _ = self._idle.popitem()  # the most recent: the least likely closed
            connection._leave_pool()
            if not connection.closed and not connection.spoiled:
                connection._start()
                return connection
            connection.close()
        return None

    def _release(self, connection: _Connection) -> None:
        self._idle[connection] = None
        connection.pool = self._idle
        connection.expiry = connection.loop.call_later(self.keepalive, connection.close)

    @property
    def idle_connections(self) -> int:
        """Pooled connections ready for the next request (for tests and diagnostics)."""
        return sum(1 for connection in self._idle if not connection.closed)

    async def aclose(self) -> None:
        idle, self._idle = list(self._idle), {}
        for connection in idle:
            connection.close()


def make_relay_upstream(upstream_url: str | None,
                        demo_tokens_per_second: float = 20.0) -> AsyncUpstream:
    """A relay's upstream: :class:`H1Upstream` to ``upstream_url``, else the built-in demo."""
    if upstream_url:
        return H1Upstream(upstream_url)
    return make_async_upstream(None, demo_tokens_per_second)
