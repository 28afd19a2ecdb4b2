"""The relays' own HTTP/1.1 client (shmstream/relay/h1client.py) against scripted servers on
real sockets: every body framing, split at every byte, content decoding, the keep-alive
pool and its stale connections, the push pump's contract, TLS, and what it refuses.
(The contract it shares with httpx runs in tests/test_upstream.py.)"""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import subprocess
import zlib

import pytest

from shmstream.relay.client import AsyncUpstreamRequest
from shmstream.relay.h1client import H1Upstream
from shmstream.relay.upstream import UpstreamError

EVENTS = [b'data: {"n":%d}\n\n' % n for n in range(5)] + [b"data: [DONE]\n\n"]
BODY = b"".join(EVENTS)


def _chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _request(body: bytes = b"{}") -> AsyncUpstreamRequest:
    return AsyncUpstreamRequest("POST", "/v1/chat/completions",
                                [("content-type", "application/json")], body)


class Scripted:
    """A server on the test's loop: each accepted connection answers its requests with
    the next scripted reply (bytes, written in ``split``-byte writes; None: close without
    answering), then stays open (keep-alive) unless ``close_after``. It records the
    requests' heads and the peer port of each."""

    def __init__(self, replies: list[bytes | None], split: int = 0, close_after: bool = False):
        self.replies = list(replies)
        self.split = split
        self.close_after = close_after
        self.heads: list[bytes] = []
        self.peers: list[int] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        self.writers.append(writer)
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.heads.append(head)
                self.peers.append(writer.get_extra_info("peername")[1])
                reply = self.replies.pop(0)
                if reply is None:  # drop the connection without answering
                    break
                step = self.split or len(reply)
                for at in range(0, len(reply), step):
                    writer.write(reply[at:at + step])
                    await writer.drain()
                    if self.split:
                        await asyncio.sleep(0)  # separate reads on the client's side
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()


async def _read_all(upstream: H1Upstream, request=None) -> tuple[int, bytes]:
    response = await upstream.open(request or _request())
    try:
        return response.status, b"".join([c async for c in response.aiter_bytes()])
    finally:
        await response.aclose()


def _run(replies, check, split=0, close_after=False):
    async def go():
        server = Scripted(replies, split, close_after)
        port = await server.start()
        upstream = H1Upstream(f"http://127.0.0.1:{port}")
        try:
            return await check(upstream, server)
        finally:
            await upstream.aclose()
            server.close()
    return asyncio.run(go())


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
@pytest.mark.parametrize("split", [0, 1, 7])
def test_every_body_framing_reads_the_bytes_exactly_however_they_are_split(framing, split):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    if framing == "chunked":
        reply = head + b"transfer-encoding: chunked\r\n\r\n" + _chunked(EVENTS)
    elif framing == "length":
        reply = head + b"content-length: %d\r\n\r\n" % len(BODY) + BODY
    else:  # HTTP/1.1 without a length: the body ends with the connection
        reply = head + b"connection: close\r\n\r\n" + BODY

    async def check(upstream, server):
        return await _read_all(upstream)
    status, body = _run([reply], check, split=split, close_after=framing == "close")
    assert status == 200 and body == BODY


def test_the_pump_pushes_each_chunk_and_the_end_from_the_protocol_step_that_parsed_it():
    # Called from data_received itself, not from the pumping task woken later: so nothing
    # else on the loop (the relay's ticker and its pings) runs between the last byte and
    # on_end, and a token costs no task wake-up.
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + _chunked(EVENTS)

    async def check(upstream, server):
        response = await upstream.open(_request())
        seen, tasks = [], []

        def on_chunk(chunk: bytes) -> bool:
            seen.append(chunk)
            tasks.append(asyncio.current_task())
            return True

        def on_end() -> None:
            seen.append(b"<end>")
            tasks.append(asyncio.current_task())
        await response.pump(on_chunk, on_end)
        await response.aclose()
        return seen, tasks, upstream.idle_connections
    seen, tasks, idle = _run([reply], check, split=1)
    assert b"".join(seen[:-1]) == BODY and seen[-1] == b"<end>"
    assert len(seen) > len(EVENTS) and set(tasks) == {None}  # every one pushed
    assert idle == 1  # read to its end: pooled


def test_a_burst_of_events_in_one_read_is_pushed_as_one_chunk():
    # An upstream that writes many HTTP chunks at once (a burst of tokens) costs one
    # append, one ring and one poll per reader, not one per event.
    async def go():
        body_now = asyncio.Event()

        async def serve(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await body_now.wait()
            writer.write(_chunked(EVENTS))  # every event, in one write
            await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = H1Upstream(f"http://127.0.0.1:{port}")
        response = await upstream.open(_request())
        seen = []
        pumping = asyncio.ensure_future(response.pump(lambda c: seen.append(c) or True,
                                                      lambda: seen.append(b"<end>")))
        await asyncio.sleep(0.05)
        body_now.set()
        await asyncio.wait_for(pumping, 5)
        await response.aclose()
        await upstream.aclose()
        server.close()
        return seen
    assert asyncio.run(go()) == [BODY, b"<end>"]


def test_a_pump_stopped_by_its_consumer_returns_and_the_connection_is_not_pooled():
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + _chunked(EVENTS)

    async def check(upstream, server):
        response = await upstream.open(_request())
        seen, ended = [], []
        await response.pump(lambda chunk: seen.append(chunk) or len(seen) < 2,
                            lambda: ended.append(True))
        await response.aclose()
        return seen, ended, upstream.idle_connections
    seen, ended, idle = _run([reply], check, split=1)
    assert len(seen) == 2 and not ended and idle == 0


def test_what_the_consumer_raises_comes_out_of_the_pump():
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + _chunked(EVENTS)

    class Gone(Exception):
        pass

    async def check(upstream, server):
        response = await upstream.open(_request())

        def on_chunk(chunk):
            raise Gone()
        try:
            with pytest.raises(Gone):
                await response.pump(on_chunk, lambda: None)
        finally:
            await response.aclose()
        return upstream.idle_connections
    assert _run([reply], check, split=1) == 0


def test_a_connection_read_to_its_end_is_reused_and_a_stale_one_is_retried():
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def check(upstream, server):
        first = await _read_all(upstream)
        second = await _read_all(upstream)
        reused = server.peers[0] == server.peers[1]
        # The server drops the idle connection; the next request must not fail for it.
        server.writers[0].close()
        await asyncio.sleep(0.05)
        server.replies.append(ok)
        third = await _read_all(upstream)
        return first, second, reused, third, len(set(server.peers))
    first, second, reused, third, peers = _run([ok, ok], check)
    assert first == second == third == (200, b"ok")
    assert reused and peers == 2


def test_the_pool_lets_go_of_what_the_server_closed_and_of_what_idled_too_long():
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def until(condition):
        for _ in range(500):
            if condition():
                return True
            await asyncio.sleep(0.01)
        return False

    async def go():
        server = Scripted([ok, ok])
        port = await server.start()
        closing = H1Upstream(f"http://127.0.0.1:{port}")
        idling = H1Upstream(f"http://127.0.0.1:{port}", keepalive=0.2)
        try:
            await _read_all(closing)
            await _read_all(idling)
            pooled = (closing.idle_connections, idling.idle_connections)
            server.writers[0].close()  # the server ends the first client's connection
            left = await until(lambda: not closing._idle)
            expired = await until(lambda: not idling._idle)  # its 0.2 s keep-alive
            # the server saw the expired one closed by the client
            return pooled, left, expired, await until(server.writers[1].is_closing)
        finally:
            await closing.aclose()
            await idling.aclose()
            server.close()
    pooled, left, expired, closed = asyncio.run(go())
    assert pooled == (1, 1) and left and expired and closed


def test_an_idle_connection_that_gets_bytes_is_never_reused():
    # Between answers nothing may come (a server's "408" before it closes, garbage): the
    # connection's stream is out of step, so it leaves the pool at once.
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def check(upstream, server):
        await _read_all(upstream)
        server.writers[0].write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        for _ in range(500):
            if not upstream._idle:
                break
            await asyncio.sleep(0.01)
        left = not upstream._idle
        server.replies.append(ok)
        return left, await _read_all(upstream), len(set(server.peers))
    left, result, peers = _run([ok], check)
    assert left and result == (200, b"ok") and peers == 2


def test_a_pooled_connection_the_server_drops_as_the_request_goes_out_is_retried_once():
    # The server closes the kept-alive connection on reading the next request, before any
    # byte of an answer (its keep-alive ran out just then): the client sends it again on a
    # fresh connection, once.
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def check(upstream, server):
        first = await _read_all(upstream)
        second = await _read_all(upstream)
        return first, second, len(server.heads), len(set(server.peers))
    first, second, requests, peers = _run([ok, None, ok], check)
    assert first == second == (200, b"ok")
    assert requests == 3 and peers == 2  # the dropped one, then the retry elsewhere


def test_gzip_and_deflate_bodies_are_decoded_and_others_refused():
    compressed = gzip.compress(BODY)
    deflated = zlib.compress(BODY)

    async def check(upstream, server):
        results = [await _read_all(upstream) for _ in range(2)]
        with pytest.raises(UpstreamError) as info:
            await _read_all(upstream)
        return results, info.value.message
    results, message = _run([
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
        + _chunked([compressed[:10], compressed[10:]]),
        b"HTTP/1.1 200 OK\r\ncontent-encoding: deflate\r\ncontent-length: %d\r\n\r\n"
        % len(deflated) + deflated,
        b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 1\r\n\r\nx",
    ], check)
    assert results == [(200, BODY), (200, BODY)]
    assert "Content-Encoding 'br'" in message


def test_an_informational_answer_is_skipped_and_the_real_one_read():
    reply = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\n"
             b"content-type: application/json\r\ncontent-length: 12\r\n\r\n"
             + json.dumps({"error": 1}).encode())

    async def check(upstream, server):
        response = await upstream.open(_request())
        try:
            return response.status, response.reason, await response.read(100)
        finally:
            await response.aclose()
    assert _run([reply], check, split=3) == (404, "Not Found", b'{"error": 1}')


@pytest.mark.parametrize("reply, expected", [
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab", "in the middle"),
    (b"HTTP/1.1 200 OK\r\ncontent-le", "inside its headers"),
    (b"NOT HTTP AT ALL\r\n\r\n", "invalid answer"),
    (b"", "without an answer"),
])
def test_a_broken_answer_is_an_upstream_error_that_says_what_broke(reply, expected):
    async def check(upstream, server):
        with pytest.raises(UpstreamError) as info:
            await _read_all(upstream)
        return info.value
    error = _run([reply], check, close_after=True)
    assert error.status == 502 and expected in error.message, error.message


def test_the_request_head_is_framed_by_the_client_and_line_breaks_are_refused():
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def check(upstream, server):
        await _read_all(upstream, AsyncUpstreamRequest(
            "POST", "/v1/x?a=%20", [("Host", "evil"), ("Content-Length", "999"),
                                    ("Transfer-Encoding", "chunked"), ("X-A", "1")], b"abc"))
        refused = []
        for request in (AsyncUpstreamRequest("POST", "/v1/x", [("X-A", "1\r\nX-B: 2")], b""),
                        AsyncUpstreamRequest("POST", "/v1/x HTTP/1.1\r\nX: y", [], b"")):
            with pytest.raises(UpstreamError) as info:
                await upstream.open(request)
            refused.append(info.value.message)
        return server.heads[0], refused
    head, refused = _run([ok], check)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "POST /v1/x?a=%20 HTTP/1.1"
    assert lines[1].startswith("Host: 127.0.0.1:") and "Host: evil" not in lines
    assert "Content-Length: 3" in lines and "X-A: 1" in lines
    assert not any(line.lower().startswith("transfer-encoding") for line in lines)
    assert "line break" in refused[0] and "line break" in refused[1]


def test_a_base_url_path_prefixes_the_target_and_its_userinfo_is_basic_auth():
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def go():
        server = Scripted([ok])
        port = await server.start()
        upstream = H1Upstream(f"http://us%40er:pw@127.0.0.1:{port}/prefix/")
        try:
            await _read_all(upstream)
        finally:
            await upstream.aclose()
            server.close()
        return server.heads[0].decode()
    head = asyncio.run(go())
    assert head.startswith("POST /prefix/v1/chat/completions HTTP/1.1\r\n")
    assert "Authorization: Basic dXNAZXI6cHc=\r\n" in head  # us@er:pw
    with pytest.raises(ValueError):
        H1Upstream("ftp://example.com")


def test_https_with_the_servers_ca_and_a_refusal_without_it(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + _chunked(EVENTS)

    async def go():
        server = Scripted([reply, reply])
        port = await server.start(server_context)
        trusting = ssl.create_default_context(cafile=str(cert))
        upstream = H1Upstream(f"https://localhost:{port}", ssl_context=trusting)
        stranger = H1Upstream(f"https://localhost:{port}")  # the system's CAs only
        try:
            result = await _read_all(upstream)
            with pytest.raises(UpstreamError) as info:
                await _read_all(stranger)
            return result, info.value.message
        finally:
            await upstream.aclose()
            await stranger.aclose()
            server.close()
    result, refusal = asyncio.run(go())
    assert result == (200, BODY)
    assert "ConnectError" in refusal and "CERTIFICATE_VERIFY_FAILED" in refusal
