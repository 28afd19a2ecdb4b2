"""The upstream clients (HttpAsyncUpstream: httpx, the HTTP workers' proxy; H1Upstream:
httptools in a protocol, the relays') against a real scripted SSE server in a thread (real
sockets), the async demo upstream, and the shared error and header helpers."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from polling import wait_for
from sse_upstream import InThreadUpstream, expected_body

from shmstream.relay.client import AsyncUpstreamRequest, HttpAsyncUpstream, make_async_upstream
from shmstream.relay.demo import DEMO_MODEL, AsyncDemoUpstream
from shmstream.relay.h1client import H1Upstream, make_relay_upstream
from shmstream.relay.producer import upstream_error
from shmstream.relay.upstream import (
    UpstreamError,
    error_event,
    error_object,
    error_type_for,
    response_headers,
)


@pytest.fixture(scope="module")
def upstream_server():
    server = InThreadUpstream()
    yield server
    server.stop()


@pytest.fixture(params=[HttpAsyncUpstream, H1Upstream], ids=["httpx", "h1"])
def client_class(request):
    return request.param


def completion(script: dict, stream: bool = True) -> AsyncUpstreamRequest:
    body = json.dumps({"stream": stream, "script": script}).encode()
    return AsyncUpstreamRequest("POST", "/v1/chat/completions",
                                [("content-type", "application/json"),
                                 ("authorization", "Bearer up-key")], body)


async def _collect(upstream, request) -> tuple[int, bytes]:
    response = await upstream.open(request)
    try:
        return response.status, b"".join([c async for c in response.aiter_bytes()])
    finally:
        await response.aclose()


def test_stream_is_read_verbatim_and_headers_reach_the_upstream(upstream_server, client_class):
    async def go():
        upstream = client_class(upstream_server.url)
        try:
            return await _collect(upstream, completion({"tag": "v", "events": 7}))
        finally:
            await upstream.aclose()
    status, body = asyncio.run(go())
    assert status == 200 and body == expected_body("v", 7)
    headers = upstream_server.record("v").headers
    assert headers.get("authorization") == "Bearer up-key"


def test_connections_are_pooled(upstream_server):
    opened = []

    class Counting(httpx.AsyncHTTPTransport):  # httpx's public transport, not its internals
        async def handle_async_request(self, request):
            response = await super().handle_async_request(request)
            opened.append(response.extensions.get("network_stream"))
            return response

    async def go():
        upstream = HttpAsyncUpstream(upstream_server.url, transport_factory=Counting)
        try:
            for index in range(3):
                await _collect(upstream, completion({"tag": f"p{index}", "events": 2}))
        finally:
            await upstream.aclose()
    asyncio.run(go())
    assert len(opened) == 3 and len({id(s) for s in opened}) == 1  # one connection, reused


def test_concurrent_streams_are_spread_over_clients_of_bounded_size(upstream_server):
    async def go():
        upstream = HttpAsyncUpstream(upstream_server.url, shard_size=4)
        responses = [await upstream.open(completion({"tag": f"sh{i}", "events": 1}))
                     for i in range(10)]
        sizes = [shard.active for shard in upstream.shards]
        for response in responses:
            async for _ in response.aiter_bytes():
                pass
            await response.aclose()
        after = [shard.active for shard in upstream.shards]
        reused = await upstream.open(completion({"tag": "sh-again", "events": 1}))
        first_again = upstream.shards[0].active
        await reused.aclose()
        await upstream.aclose()
        return sizes, after, first_again
    sizes, after, first_again = asyncio.run(go())
    assert sizes == [4, 4, 2] and after == [0, 0, 0] and first_again == 1


def test_cancelling_the_reading_task_closes_the_connection(upstream_server, client_class):
    async def go():
        upstream = client_class(upstream_server.url)
        response = await upstream.open(completion({"tag": "c", "events": 5, "stall_at": 1,
                                                   "stall": 30}))

        async def read():
            async for _ in response.aiter_bytes():
                pass

        task = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await response.aclose()
        await upstream.aclose()
    asyncio.run(go())
    assert wait_for(lambda: upstream_server.record("c").closed_at, timeout=5)
    assert not upstream_server.record("c").finished


def test_unreachable_upstream_raises_upstream_error(client_class):
    async def go():
        upstream = client_class("http://127.0.0.1:9")
        try:
            await upstream.open(completion({}))
        finally:
            await upstream.aclose()
    with pytest.raises(UpstreamError) as info:
        asyncio.run(go())
    assert info.value.status == 502 and "Connect" in info.value.message


def test_a_broken_body_raises_upstream_error(upstream_server, client_class):
    async def go():
        upstream = client_class(upstream_server.url)
        try:
            await _collect(upstream, completion({"tag": "b", "events": 5, "break_after": 2}))
        finally:
            await upstream.aclose()
    with pytest.raises(UpstreamError):
        asyncio.run(go())


def test_demo_streams_every_format_and_ends_with_its_terminal_event():
    demo = AsyncDemoUpstream(tokens_per_second=0)
    body = json.dumps({"stream": True, "max_tokens": 3,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    endings = {"/v1/chat/completions": b"data: [DONE]\n\n",
               "/v1/messages": b'"type":"message_stop"}\n\n',
               "/v1/responses": b"\n\n"}
    for path, ending in endings.items():
        status, data = asyncio.run(_collect(demo, AsyncUpstreamRequest("POST", path, [], body)))
        assert status == 200 and data.endswith(ending), path
    status, data = asyncio.run(_collect(demo, AsyncUpstreamRequest("GET", "/v1/models")))
    assert json.loads(data)["data"][0]["id"] == DEMO_MODEL
    status, _ = asyncio.run(_collect(demo, AsyncUpstreamRequest("GET", "/v1/chat/completions")))
    assert status == 405


def test_make_async_upstream_picks_the_demo_without_a_url():
    assert isinstance(make_async_upstream(None), AsyncDemoUpstream)
    assert isinstance(make_async_upstream("http://x:1"), HttpAsyncUpstream)
    assert isinstance(make_relay_upstream(None), AsyncDemoUpstream)
    assert isinstance(make_relay_upstream("http://x:1"), H1Upstream)


def test_the_relay_client_sends_the_request_as_forwarded(upstream_server):
    """The relay client adds no Content-Type or Accept-Encoding of its own (the relay asks for the
    bytes as they are), sends the target still percent-encoded, and one Content-Length
    that fits the body whatever the forwarded headers said."""
    body = json.dumps({"stream": True, "script": {"tag": "fwd", "events": 2}}).encode()
    request = AsyncUpstreamRequest("POST", "/v1/chat/completions?x=a%2Fb",
                                   [("authorization", "Bearer k"), ("content-length", "1"),
                                    ("x-one", "1"), ("x-one", "2")], body)

    async def go():
        upstream = H1Upstream(upstream_server.url)
        try:
            return await _collect(upstream, request)
        finally:
            await upstream.aclose()
    status, data = asyncio.run(go())
    assert status == 200 and data == expected_body("fwd", 2)
    record = upstream_server.record("fwd")
    assert "content-type" not in record.headers and "accept-encoding" not in record.headers
    assert record.headers.get("content-length") == str(len(body))


def test_error_helpers():
    assert error_type_for(404) == "not_found_error"
    assert error_type_for(422) == "invalid_request_error"
    assert error_type_for(502) == "server_error"
    error = error_object(400, "bad")
    assert error == {"code": 400, "message": "bad", "type": "invalid_request_error"}
    assert error_event(error) == b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
    own = {"code": 400, "message": "too long", "type": "exceed_context_size_error"}
    assert upstream_error(400, "Bad Request", json.dumps({"error": own}).encode()) == own
    assert upstream_error(500, "Internal", b"kaputt")["message"] == "kaputt"
    assert upstream_error(503, "Unavailable", b"")["message"] == "upstream returned 503 Unavailable"


def test_response_headers_filtering():
    headers = [("Content-Type", "text/event-stream"), ("Connection", "X-Hop"),
               ("X-Hop", "secret"), ("Keep-Alive", "timeout=5"), ("Content-Length", "12"),
               ("Transfer-Encoding", "chunked"), ("Date", "x"), ("X-Upstream", "yes")]
    assert response_headers(headers) == [("Content-Type", "text/event-stream"),
                                         ("Content-Length", "12"), ("X-Upstream", "yes")]
    assert ("Content-Length", "12") not in response_headers(headers, reframed=True)


def test_the_relay_client_keeps_the_target_percent_encoded(upstream_server):
    async def go():
        upstream = H1Upstream(upstream_server.url)
        try:
            return await _collect(upstream, AsyncUpstreamRequest(
                "GET", "/v1/echo/a%2Fb?q=x%20y&q=z", [], b""))
        finally:
            await upstream.aclose()
    status, data = asyncio.run(go())
    echo = json.loads(data)
    assert status == 200 and echo["target"] == "/v1/echo/a%2Fb?q=x%20y&q=z"
    assert echo["method"] == "GET" and echo["body_length"] == 0
