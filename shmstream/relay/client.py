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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from shmstream.relay.upstream import DEFAULT_TIMEOUT, UpstreamError

# Thousands of concurrent streams per relay: no cap on connections (the upstream's own
# queue decides), a pool of idle keep-alive connections for the next requests.
DEFAULT_ASYNC_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256,
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
    def __init__(self, response: httpx.Response):
        self._response = response
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.headers = [(k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in response.headers.raw]

    async def _iterate(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(_describe(exc)) from exc

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        encoding = self._response.headers.get("content-encoding", "identity").lower()
        if encoding in ("", "identity"):  # skip httpx's decoder chain: a hot path
            return self._iterate(self._response.aiter_raw())
        return self._iterate(self._response.aiter_bytes())

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._iterate(self._response.aiter_raw())

    async def aclose(self) -> None:
        with contextlib.suppress(httpx.HTTPError, OSError):
            await self._response.aclose()


def _describe(exc: Exception) -> str:
    kind = type(exc).__name__
    return f"upstream {kind}: {exc}" if str(exc) else f"upstream {kind}"


class HttpAsyncUpstream(AsyncUpstream):
    """An OpenAI-compatible server over HTTP(S). ``timeout`` and ``limits`` are httpx's own
    settings, passed to the client as they are."""

    def __init__(self, base_url: str, timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                 limits: httpx.Limits = DEFAULT_ASYNC_LIMITS,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.description = f"http upstream {self.base_url}"
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport,
                                        follow_redirects=False)

    async def open(self, request: AsyncUpstreamRequest) -> AsyncUpstreamResponse:
        built = self.client.build_request(
            request.method, self.base_url + request.target,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
            content=request.body,
        )
        try:
            response = await self.client.send(built, stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamError(_describe(exc)) from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self.client.aclose()


def make_async_upstream(upstream_url: str | None,
                        demo_tokens_per_second: float = 20.0) -> AsyncUpstream:
    """The configured upstream: HTTP to ``upstream_url``, else the built-in demo."""
    if upstream_url:
        return HttpAsyncUpstream(upstream_url)
    from shmstream.relay.demo import AsyncDemoUpstream

    return AsyncDemoUpstream(demo_tokens_per_second)
