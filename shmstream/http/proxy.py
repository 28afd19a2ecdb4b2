"""The transparent streaming reverse proxy: every path shmstream does not answer itself.

Over HTTP it uses the upstream's pooled ``httpx.AsyncClient`` and streams both ways: the
request body as it arrives (only when the client sent one: a GET without a body reaches the
upstream without ``Transfer-Encoding: chunked``), the response body as the upstream sends
it, until the client leaves. Other upstreams (the built-in demo) get the body read whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import falcon
import httpx

from shmstream import metrics
from shmstream.http import parsing
from shmstream.http.streaming import LINK_KEY, ClientBoundStream
from shmstream.relay.client import AsyncUpstream, AsyncUpstreamRequest
from shmstream.relay.upstream import UpstreamError

MAX_BUFFERED_BODY = 64 * 1024 * 1024  # a body read whole for a non-HTTP upstream


@dataclass
class ProxyAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    close: object  # async callable: release the upstream connection


class Proxy:
    """Relays one request to ``upstream`` and hands back its answer, streaming."""

    def __init__(self, upstream: AsyncUpstream, upstream_api_key: str | None = None):
        self.upstream = upstream
        self.upstream_api_key = upstream_api_key

    async def open(self, req: falcon.Request, body: bytes | None = None) -> ProxyAnswer:
        """Send ``req`` (with ``body`` when the caller read it already). Raises
        UpstreamError (502) when the upstream cannot be reached."""
        headers = parsing.forward_headers(req, self.upstream_api_key)
        client = getattr(self.upstream, "client", None)
        base_url = getattr(self.upstream, "base_url", None)
        if isinstance(client, httpx.AsyncClient) and base_url:
            return await self._open_http(client, base_url, req, headers, body)
        if body is None:
            body = await parsing.read_body(req, MAX_BUFFERED_BODY)
        response = await self.upstream.open(AsyncUpstreamRequest(
            req.method, parsing.target(req), headers, body))
        return ProxyAnswer(response.status, parsing.response_headers(response.headers),
                           response.aiter_raw(), response.aclose)

    async def _open_http(self, client: httpx.AsyncClient, base_url: str,
                         req: falcon.Request, headers: list[tuple[str, str]],
                         body: bytes | None) -> ProxyAnswer:
        if body is not None:
            content = body
            headers = [(k, v) for k, v in headers if k != "content-length"]
        elif parsing.has_body(req):
            content = _request_chunks(req)  # Content-Length kept, else sent chunked
        else:
            content = None
        request = client.build_request(req.method, base_url + parsing.target(req),
                                       headers=headers, content=content)
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            metrics.upstream_error("proxy")
            raise UpstreamError.caused_by(exc) from exc
        headers_out = [(k.decode("latin-1"), v.decode("latin-1"))
                       for k, v in response.headers.raw]
        return ProxyAnswer(response.status_code, parsing.response_headers(headers_out),
                           _response_chunks(response), response.aclose)


async def _request_chunks(req: falcon.Request) -> AsyncIterator[bytes]:
    async for chunk in req.stream:
        if chunk:
            yield chunk


async def _response_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        return  # the upstream broke off: end the body (the client sees it short)


async def relay_answer(req: falcon.Request, resp: falcon.Response, answer: ProxyAnswer
                       ) -> None:
    """Put the upstream's answer on ``resp``: status, headers, and the body streaming
    until it ends or the client leaves."""
    resp.status = answer.status
    for name, value in answer.headers:
        resp.append_header(name, value)
    if req.method == "HEAD" or answer.status in (204, 304) or answer.status < 200:
        with contextlib.suppress(Exception):
            await answer.close()
        return
    resp.stream = ClientBoundStream(answer.body, req.scope.get(LINK_KEY), answer.close)
