"""The relay: HttpUpstream against a real scripted SSE server (in a thread, real sockets),
producers, the cancel watcher, pings, error mapping and header filtering."""

from __future__ import annotations

import json
import threading
import time

import pytest
from polling import wait_for as _wait_for
from sse_upstream import InThreadUpstream, expected_body

from shmstream.relay.upstream import (
    PING,
    Abort,
    HttpUpstream,
    ProducerWatcher,
    Relay,
    Upstream,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    _at_boundary,
    request_headers,
    response_headers,
)
from shmstream.shm.store import ShmStore
from shmstream.store.states import State

CANCEL_BUDGET = 0.25  # seconds from a cancel anywhere to the upstream seeing its client go


@pytest.fixture(scope="module")
def upstream_server():
    server = InThreadUpstream()
    yield server
    server.stop()


@pytest.fixture
def store(namespace):
    return ShmStore(namespace, capacity=256 * 1024)


@pytest.fixture
def relay(store, upstream_server):
    upstream = HttpUpstream(upstream_server.url)
    relay = Relay(store, upstream, ping_interval=0.1)
    yield relay
    relay.watcher.shutdown()
    upstream.close()


def completion(script: dict, stream: bool = True, headers=()) -> UpstreamRequest:
    body = json.dumps({"stream": stream, "script": script}).encode()
    return UpstreamRequest("POST", "/v1/chat/completions",
                           [(b"content-type", b"application/json"), *headers], body)


def wait_for(predicate, timeout: float = 5.0, step: float = 0.002):
    return _wait_for(predicate, timeout, step)


def read_all(session) -> bytes:
    try:
        return b"".join(session.read(0))
    finally:
        session.close()


def test_stream_is_relayed_verbatim_and_finalized(relay, upstream_server, store):
    producer, reader = relay.start("c1", completion({"tag": "v1", "events": 30,
                                                     "interval": 0.002, "pad": 50}))
    answer = producer.wait_answer()
    assert answer.status == 200 and answer.body is None
    assert ("Content-Type", "text/event-stream") in answer.headers
    data = read_all(reader)
    assert data == bytes(upstream_server.record("v1").sent) == expected_body("v1", 30, 50)
    assert producer.finished.wait(2)
    assert producer.final_state is State.DONE
    assert store.lookup(["c1"])[0].state is State.DONE


def test_connections_are_pooled(relay, upstream_server):
    before = upstream_server.server.connections
    for index in range(3):
        producer, reader = relay.start(f"p{index}", completion({"events": 2, "interval": 0}))
        read_all(reader)
        assert producer.finished.wait(2)
    assert upstream_server.server.connections - before <= 1


def test_pings_during_prompt_processing_then_the_answer(relay, upstream_server):
    _producer, reader = relay.start("c2", completion({"tag": "pp", "events": 3,
                                                     "stall_before": 0.35}))
    data = read_all(reader)
    assert data.startswith(PING * 2)
    assert data.replace(PING, b"") == expected_body("pp", 3)


def test_pings_while_the_upstream_is_silent_mid_stream(relay, upstream_server):
    _producer, reader = relay.start("c3", completion({"tag": "mid", "events": 4,
                                                     "stall_at": 2, "stall": 0.35}))
    data = read_all(reader)
    first_two = expected_body("mid", 2, done=False)
    assert data.startswith(first_two + PING)
    assert data.replace(PING, b"") == expected_body("mid", 4)


class _TornUpstream(Upstream):
    """Sends half an event, stays silent, then the rest."""

    def open(self, request):
        class Response(UpstreamResponse):
            status, reason, headers = 200, "OK", [("Content-Type", "text/event-stream")]

            def iter_bytes(self):
                yield b"data: {\"half\": "
                time.sleep(0.4)
                yield b"1}\n\n"

            iter_raw = iter_bytes

            def close(self):
                pass

        return Response()


def test_no_ping_splits_an_event(store):
    relay = Relay(store, _TornUpstream(), ping_interval=0.05)
    try:
        _producer, reader = relay.start("torn", completion({}))
        assert read_all(reader) == b"data: {\"half\": 1}\n\n"
    finally:
        relay.watcher.shutdown()


def test_at_boundary():
    assert _at_boundary(b"")
    assert _at_boundary(b"a\n\n") and _at_boundary(b"\r\n\r\n") and _at_boundary(b"\r\r")
    assert not _at_boundary(b"data: x\n") and not _at_boundary(b"data: x")


def _wait_closed(upstream_server, tag: str) -> float:
    return wait_for(lambda: (upstream_server.record(tag) or None)
                    and upstream_server.record(tag).closed_at, timeout=3)


def test_cancel_mid_stream_closes_the_silent_upstream_within_budget(relay, upstream_server,
                                                                    store):
    producer, reader = relay.start("c4", completion({"tag": "cx", "events": 5,
                                                     "stall_at": 2, "stall": 30}))
    producer.wait_answer()
    wait_for(lambda: upstream_server.record("cx").events_sent == 2)
    time.sleep(0.15)  # the upstream is now silent
    started = time.time()
    assert store.evict_and_cancel("c4")
    latency = _wait_closed(upstream_server, "cx") - started
    print(f"cancel latency mid-stream: {latency * 1000:.1f} ms")
    assert latency < CANCEL_BUDGET
    assert producer.finished.wait(2)
    assert producer.final_state is State.CANCELLED
    data = read_all(reader)
    assert data.startswith(expected_body("cx", 2, done=False))
    assert b"error" not in data and b"[DONE]" not in data


def test_cancel_during_prompt_processing_closes_the_upstream(relay, upstream_server, store):
    producer, reader = relay.start("c5", completion({"tag": "pc", "stall_before": 30}))
    wait_for(lambda: upstream_server.record("pc"))
    time.sleep(0.1)
    started = time.time()
    assert store.evict_and_cancel("c5")
    latency = _wait_closed(upstream_server, "pc") - started
    print(f"cancel latency before the status line: {latency * 1000:.1f} ms")
    assert latency < CANCEL_BUDGET
    answer = producer.wait_answer()
    assert answer.status == 200 and answer.body is None  # the caller reads a cancelled session
    assert producer.finished.wait(2) and producer.final_state is State.CANCELLED
    reader.close()


def test_replacing_cancels_the_first_producer(relay, upstream_server):
    first, first_reader = relay.start("same", completion({"tag": "r1", "events": 3,
                                                          "stall_at": 1, "stall": 30}))
    first.wait_answer()
    wait_for(lambda: upstream_server.record("r1").events_sent == 1)
    _second, second_reader = relay.start("same", completion({"tag": "r2", "events": 3}))
    _wait_closed(upstream_server, "r1")
    assert first.finished.wait(2) and first.final_state is State.CANCELLED
    assert read_all(second_reader) == expected_body("r2", 3)
    read_all(first_reader)


def test_upstream_error_status_goes_to_the_caller_and_the_session(relay, store):
    error = {"error": {"code": 400, "message": "context too long",
                       "type": "exceed_context_size_error", "n_ctx": 8}}
    producer, reader = relay.start("e1", completion({"status": 400, "error_body": error}))
    answer = producer.wait_answer()
    assert answer.status == 400
    assert json.loads(answer.body) == error
    assert read_all(reader) == b"data: " + json.dumps({"error": error["error"]}).encode() \
        + b"\n\n"
    assert producer.finished.wait(2) and producer.final_state is State.FAILED


def test_upstream_error_without_an_error_object(relay):
    producer, reader = relay.start("e2", completion({"status": 503,
                                                     "error_body": {"detail": "overloaded"}}))
    assert producer.wait_answer().status == 503
    assert read_all(reader) == (b'data: {"error": {"code": 503, "message": "overloaded", '
                                b'"type": "unavailable_error"}}\n\n')


def test_mid_stream_break_appends_an_error_and_fails(relay):
    producer, reader = relay.start("e3", completion({"tag": "brk", "events": 5,
                                                     "break_after": 2}))
    data = read_all(reader)
    assert data.startswith(expected_body("brk", 2, done=False) + b'data: {"error": ')
    event = json.loads(data[len(expected_body("brk", 2, done=False)) + 6:])
    assert event["error"]["type"] == "server_error" and event["error"]["code"] == 502
    assert producer.finished.wait(2) and producer.final_state is State.FAILED


def test_unreachable_upstream_gives_502_and_a_failed_session(store):
    relay = Relay(store, HttpUpstream("http://127.0.0.1:9"), ping_interval=1)
    try:
        producer, reader = relay.start("e4", completion({}))
        answer = producer.wait_answer()
        assert answer.status == 502
        body = json.loads(answer.body)
        assert body["error"]["code"] == 502 and body["error"]["type"] == "server_error"
        assert read_all(reader) == b"data: " + json.dumps(body).encode() + b"\n\n"
        assert producer.finished.wait(2) and producer.final_state is State.FAILED
    finally:
        relay.watcher.shutdown()


def test_watcher_shutdown_aborts_running_sessions(store, upstream_server):
    upstream = HttpUpstream(upstream_server.url)
    relay = Relay(store, upstream, ping_interval=1, watcher=ProducerWatcher())
    producer, reader = relay.start("sd", completion({"tag": "sd", "stall_before": 30}))
    wait_for(lambda: upstream_server.record("sd"))
    relay.watcher.shutdown()
    _wait_closed(upstream_server, "sd")
    assert producer.finished.wait(2) and producer.final_state is State.ABORTED
    reader.close()
    upstream.close()


def test_abort_is_a_no_op_after_detach():
    abort = Abort()
    abort.detach()
    assert not abort.abort() and not abort.aborted
    fired = threading.Event()
    other = Abort()
    assert other.abort()
    other.on_abort(fired.set)
    assert fired.is_set()


def test_http_upstream_open_after_abort_raises(upstream_server):
    upstream = HttpUpstream(upstream_server.url)
    request = UpstreamRequest("GET", "/health", [], None, Abort())
    request.abort.abort()
    with pytest.raises(UpstreamError, match="aborted"):
        upstream.open(request)
    upstream.close()


def test_request_headers_filtering():
    environ = {
        "HTTP_HOST": "front", "HTTP_CONNECTION": "keep-alive, X-Private",
        "HTTP_X_PRIVATE": "1", "HTTP_KEEP_ALIVE": "5", "HTTP_TE": "trailers",
        "HTTP_TRANSFER_ENCODING": "chunked", "HTTP_UPGRADE": "h2c",
        "HTTP_AUTHORIZATION": "Bearer client", "HTTP_X_CONVERSATION_ID": "caf\xc3\xa9",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "12",
        "HTTP_ACCEPT_ENCODING": "gzip", "REMOTE_ADDR": "10.0.0.9",
        "HTTP_X_FORWARDED_FOR": "1.2.3.4", "wsgi.input": None,
    }
    headers = dict(request_headers(environ))
    assert headers == {
        b"authorization": b"Bearer client",
        b"content-type": b"application/json", b"content-length": b"12",
        b"accept-encoding": b"gzip", b"x-forwarded-for": b"1.2.3.4, 10.0.0.9",
    }
    # the session header is shmstream's, in any case: forwarding it made llama-server keep
    # generating after a Stop (it drains sessions of its own to their end)
    assert not any(name.lower() == b"x-conversation-id" for name, _ in headers.items())
    replaced = dict(request_headers(environ, "secret", identity=True, with_length=False))
    assert replaced[b"authorization"] == b"Bearer secret"
    assert replaced[b"accept-encoding"] == b"identity"
    assert b"content-length" not in replaced


def test_response_headers_filtering():
    headers = [("Content-Type", "text/event-stream"), ("Connection", "X-Hop"),
               ("X-Hop", "1"), ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"),
               ("Set-Cookie", "b=2"), ("Content-Length", "5"), ("Content-Encoding", "gzip"),
               ("Date", "now"), ("Server", "llama")]
    assert response_headers(headers) == [
        ("Content-Type", "text/event-stream"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
        ("Content-Length", "5"), ("Content-Encoding", "gzip")]
    assert response_headers(headers, reframed=True) == [
        ("Content-Type", "text/event-stream"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_authorization_reaches_the_upstream(relay, upstream_server):
    request = completion({"tag": "auth", "events": 1},
                         headers=[(b"authorization", b"Bearer k1")])
    _producer, reader = relay.start("h1", request)
    read_all(reader)
    assert upstream_server.record("auth").headers["authorization"] == "Bearer k1"
