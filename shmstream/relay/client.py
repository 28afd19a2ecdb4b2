"""The upstream seen from an event loop: one pooled ``httpx.AsyncClient`` per relay process.

A call is cancelled the asyncio way: cancelling the task that awaits :meth:`AsyncUpstream.open`
or iterates the body closes that request's connection (httpx does not return a connection
whose body was not read to the pool), so the upstream sees its client go and stops
generating. No hook into httpx's internals is needed for that, unlike the threaded relay,
which had to shut sockets down from another thread.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from shmstream.relay.upstream import DEFAULT_TIMEOUT, UpstreamError

# httpcore's pool does bookkeeping over all its connections each time a request starts or
# ends (quadratic in them: measured 58 ms per request with 300 streams on one client, the
# relay's loop stalled for seconds). So a relay spreads its streams over several clients of
# at most SHARD_SIZE concurrent requests each, filled in order (keep-alive reuse stays in
# the first ones).
SHARD_SIZE = 32
DEFAULT_ASYNC_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=SHARD_SIZE,
                                    keepalive_expiry=30.0)


@dataclass
class AsyncUpstreamRequest:
    method: str
    target: str  # path and query, as the client sent them (still percent-encoded)
    headers: list[tuple[str, str]] = field(default_factory=list)  # latin-1 text
    body: bytes = b""


class AsyncUpstreamResponse(abc.ABC):
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as received, latin-1 text, hop-by-hop included

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    @abc.abstractmethod
    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body, content-decoded, in chunks as they arrive. Raises UpstreamError."""

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as sent (content-encoding kept). Raises UpstreamError."""
        return self.aiter_bytes()

    async def pump(self, on_chunk: Callable[[bytes], bool], on_end: Callable[[], None]
                   ) -> None:
        """Push the decoded body into ``on_chunk`` until it returns False (the rest is not
        read) or the body ends; ``on_end()`` runs in the same step as the body's end, so
        nothing else on the loop runs between the last byte and it. Raises UpstreamError,
        or what ``on_chunk`` raised. This default iterates :meth:`aiter_bytes`; a client
        whose protocol parses the body can call ``on_chunk`` as the bytes arrive."""
        async for chunk in self.aiter_bytes():
            if not on_chunk(chunk):
                return
        on_end()

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the decoded body (the rest is dropped)."""
        parts, size = [], 0
        async for chunk in self.aiter_bytes():
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
        return b"".join(parts)[:limit]

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection (closed if the body was not read to its end); idempotent."""


class AsyncUpstream(abc.ABC):
    """An OpenAI-compatible server, called from an event loop."""

    description = "upstream"

    @abc.abstractmethod
    async def open(self, request: AsyncUpstreamRequest) -> AsyncUpstreamResponse:
        """Send the request; return once the status line and headers are in.

        Raises :class:`~shmstream.relay.upstream.UpstreamError` when the upstream cannot
        be reached or times out."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release pooled connections."""


class _HttpxResponse(AsyncUpstreamResponse):
    def __init__(self, response: httpx.Response, on_close: Callable[[], None]):
        self._response = response
        self._on_close: Callable[[], None] | None = on_close
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.headers = [(k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in response.headers.raw]

    async def _iterate(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError.caused_by(exc) from exc

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        encoding = self._response.headers.get("content-encoding", "identity").lower()
        if encoding in ("", "identity"):  # skip httpx's decoder chain: a hot path
            return self._iterate(self._response.aiter_raw())
        return self._iterate(self._response.aiter_bytes())

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._iterate(self._response.aiter_raw())

    async def aclose(self) -> None:
        try:
            with contextlib.suppress(httpx.HTTPError, OSError):
                await self._response.aclose()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


class _Shard:
    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.active = 0


class HttpAsyncUpstream(AsyncUpstream):
    """An OpenAI-compatible server over HTTP(S). ``timeout`` and ``limits`` are httpx's own
    settings, passed as they are to each client; ``transport_factory`` makes each client's
    transport (an httpx transport of your own, for hooks)."""

    def __init__(self, base_url: str, timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                 limits: httpx.Limits = DEFAULT_ASYNC_LIMITS, shard_size: int = SHARD_SIZE,
                 transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None):
        self.base_url = base_url.rstrip("/")
        self.description = f"http upstream {self.base_url}"
        self.timeout = timeout
        self.limits = limits
        self.shard_size = max(1, shard_size)
        self.transport_factory = transport_factory
        # One TLS context for every client: making one loads the CA bundle (~100 ms).
        self.ssl_context = httpx.create_ssl_context()
        self.shards: list[_Shard] = []
        self._shard()  # the first client now: it imports what httpx loads lazily (~80 ms)

    @property
    def client(self) -> httpx.AsyncClient:
        """The first client: for callers that drive httpx themselves (the HTTP workers'
        proxy streams request bodies through it)."""
        if not self.shards:
            self._shard()
        return self.shards[0].client

    def _shard(self) -> _Shard:
        for shard in self.shards:
            if shard.active < self.shard_size:
                return shard
        transport = self.transport_factory() if self.transport_factory else None
        shard = _Shard(httpx.AsyncClient(timeout=self.timeout, limits=self.limits,
                                         transport=transport, verify=self.ssl_context,
                                         follow_redirects=False))
        self.shards.append(shard)
        return shard

    async def open(self, request: AsyncUpstreamRequest) -> AsyncUpstreamResponse:
        shard = self._shard()
        built = shard.client.build_request(
            request.method, self.base_url + request.target,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
            content=request.body,
        )
        shard.active += 1

        def release() -> None:
            shard.active -= 1

        try:
            response = await shard.client.send(built, stream=True)
        except httpx.HTTPError as exc:
            release()
            raise UpstreamError.caused_by(exc) from exc
        except BaseException:
            release()
            raise
        return _HttpxResponse(response, release)

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.client.aclose()
        self.shards.clear()


def make_async_upstream(upstream_url: str | None,
                        demo_tokens_per_second: float = 20.0) -> AsyncUpstream:
    """The configured upstream: HTTP to ``upstream_url``, else the built-in demo."""
    if upstream_url:
        return HttpAsyncUpstream(upstream_url)
    from shmstream.relay.demo import AsyncDemoUpstream

    return AsyncDemoUpstream(demo_tokens_per_second)
