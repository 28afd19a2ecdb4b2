"""The relays' upstream client: one ``aiohttp.ClientSession`` per relay process, on uvloop.

Why not the HTTP workers' httpx client (:mod:`shmstream.relay.client`): a relay reads every
token of every answer, one small chunk at a time, and that read is its hot path. With 200
streams of one chunk per read on this repository's 2-core machine, httpx cost 98 µs of CPU
per chunk on asyncio and 76 µs on uvloop (a timeout scope and several context managers
per read in httpcore/anyio, h11 parsing in Python); aiohttp, whose parser is C, cost 22 µs
on uvloop (``scripts/bench_upstream_client.py``, side by side in one run). The HTTP
workers' proxy keeps httpx: it streams request bodies and is not per-token.

Cancelling the task that awaits :meth:`AiohttpUpstream.open` or iterates the body, then
:meth:`_AiohttpResponse.aclose`, closes that request's connection (a body not read to its
end is never returned to the pool), so the upstream sees its client go and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import aiohttp
import yarl

from shmstream.relay.client import (
    AsyncUpstream,
    AsyncUpstreamRequest,
    AsyncUpstreamResponse,
    make_async_upstream,
)
from shmstream.relay.upstream import UpstreamError

# connect covers waiting for a pooled connection and connecting (httpx: pool 30 s +
# connect 10 s); no read timeout: prompt processing and long generations are silent, and
# pings and cancels cover a stuck upstream.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=40.0, sock_connect=10.0,
                                        sock_read=None)
KEEPALIVE_SECONDS = 30.0
# Headers aiohttp would add on its own: the forwarded request says what it means (no
# Content-Type for a body without one, no compression the client did not ask for).
_NO_AUTO_HEADERS = frozenset({"Content-Type", "Accept-Encoding"})
_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _ssl_context() -> ssl.SSLContext:
    """The system's CA store, plus certifi's bundle when it is installed (httpx's own)."""
    context = ssl.create_default_context()
    with contextlib.suppress(ImportError, OSError):
        import certifi

        context.load_verify_locations(certifi.where())
    return context


class _AiohttpResponse(AsyncUpstreamResponse):
    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = [(k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in response.raw_headers]

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        # Content-decoded (aiohttp's auto_decompress); aiter_raw is the same stream, which
        # is what the relay wants: its bytes go into the session as the client reads them.
        # readany in a loop is iter_any without its iterator object's layer per chunk.
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except _ERRORS as exc:
            raise UpstreamError.caused_by(exc) from exc

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()  # read to the end: the connection goes back to the pool
        else:
            response.close()  # cut short: close the connection, the upstream stops


class AiohttpUpstream(AsyncUpstream):
    """An OpenAI-compatible server over HTTP(S), for relay processes. The session is made
    on the first request, inside the loop that uses it (aiohttp binds it to that loop)."""

    def __init__(self, base_url: str, timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT):
        self.base_url = base_url.rstrip("/")
        self.description = f"http upstream {self.base_url}"
        self.timeout = timeout
        self.ssl_context = _ssl_context()  # loading the CA store takes ~100 ms: once
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ssl=self.ssl_context,
                                             keepalive_timeout=KEEPALIVE_SECONDS)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, auto_decompress=True,
                skip_auto_headers=_NO_AUTO_HEADERS, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def open(self, request: AsyncUpstreamRequest) -> AsyncUpstreamResponse:
        # The target is sent as the client wrote it (still percent-encoded); aiohttp
        # computes Content-Length from the body it sends.
        url = yarl.URL(self.base_url + request.target, encoded=True)
        headers = [(k, v) for k, v in request.headers if k.lower() != "content-length"]
        try:
            response = await self._client().request(
                request.method, url, headers=headers, data=request.body or None,
                allow_redirects=False)
        except _ERRORS as exc:
            raise UpstreamError.caused_by(exc) from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_relay_upstream(upstream_url: str | None,
                        demo_tokens_per_second: float = 20.0) -> AsyncUpstream:
    """A relay's upstream: aiohttp to ``upstream_url``, else the built-in demo."""
    if upstream_url:
        return AiohttpUpstream(upstream_url)
    return make_async_upstream(None, demo_tokens_per_second)
