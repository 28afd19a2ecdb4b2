"""The Falcon ASGI app in-process: every row of PROTOCOL.md's tables with exact bodies, both
URL forms, the completion hand-off to a relay, the transparent proxy, errors, the API key and
the demo.

Requests are ASGI calls as a server makes them (tests/asgi_client.py): whole answers through
``harness.client``, live streams through ``harness.open`` whose chunks the test reads one by
one and whose client it can make disconnect. Completions go to a real
:class:`~shmstream.relay.local.LocalRelay` over its unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time

import pytest
from asgi_client import AsgiClient
from polling import wait_for, wait_until
from sse_upstream import InThreadUpstream, expected_body

from shmstream.config import Settings
from shmstream.http.app import create_app
from shmstream.relay.client import HttpAsyncUpstream
from shmstream.relay.demo import DEMO_MODEL, AsyncDemoUpstream, demo_words
from shmstream.relay.local import LocalRelay
from shmstream.relay.upstream import PING
from shmstream.shm import waiter
from shmstream.shm.store import ShmStore
from shmstream.store.states import State

JSON_TYPE = "application/json; charset=utf-8"
MISSING = (b'{"error": {"code": 400, "message": "Missing conversation id in path", '
           b'"type": "invalid_request_error"}}')
NOT_FOUND = (b'{"error": {"code": 404, "message": "Stream not found or expired", '
             b'"type": "not_found_error"}}')
BAD_FROM = (b'{"error": {"code": 400, "message": "Invalid \'from\' offset", '
            b'"type": "invalid_request_error"}}')
LOST = (b'{"error": {"code": 400, "message": "Stream offset lost, please restart", '
        b'"type": "invalid_request_error"}}')


@pytest.fixture(scope="module")
def upstream_server():
    server = InThreadUpstream()
    yield server
    server.stop()


class Harness:
    def __init__(self, store, settings: Settings, upstream, relay_upstream=None):
        self.store = store
        self.settings = settings
        self.upstream = upstream
        self.relay = LocalRelay(store, relay_upstream or upstream_for(settings, upstream),
                                settings.ping_interval).start()
        self.app = create_app(store, settings, upstream, self.relay.client())
        self.client = AsgiClient(self.app)

    def session(self, conversation_id: str, data: bytes = b"", state: State | None = None):
        session = self.store.create_or_replace(conversation_id)
        session.append(data)
        if state is not None:
            session.finalize(state)
        return session

    def open(self, method: str, raw_uri: str, headers: dict | None = None, body: bytes = b"",
             **options):
        """A live call whose answer has started (``.status``, ``.headers``, ``.next()``)."""
        return self.client.open(method, raw_uri, headers, body, **options).wait_started()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the app's pooled client lives on its loop
            asyncio.run_coroutine_threadsafe(self.upstream.aclose(),
                                             self.client.loop).result(5)
        self.client.close()
        self.relay.stop()


def upstream_for(settings: Settings, upstream):
    """The relay's own upstream client, like a relay process has (not the app's)."""
    if isinstance(upstream, HttpAsyncUpstream):
        return HttpAsyncUpstream(upstream.base_url)
    return upstream


@pytest.fixture
def make_harness(namespace, upstream_server):
    made = []

    def make(capacity: int = 64 * 1024, upstream=None, **settings_options):
        settings_options.setdefault("ping_interval", 0.1)
        settings = Settings(namespace=namespace, upstream=upstream_server.url,
                            **settings_options)
        store = ShmStore(namespace, capacity=capacity, max_sessions=settings.max_sessions)
        harness = Harness(store, settings, upstream or HttpAsyncUpstream(upstream_server.url))
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def harness(make_harness):
    return make_harness()


def assert_error(result, status: int, body: bytes):
    assert result.status_code == status
    assert result.headers["content-type"] == JSON_TYPE
    assert result.content == body


def chat(script: dict | None = None, stream: bool = True, **extra) -> dict:
    return {"stream": stream, "messages": [{"role": "user", "content": "hi"}],
            "script": script or {}, **extra}


# --- GET /v1/stream ------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["/v1/stream/", "/v1/stream", "/v1/stream?conv_id=",
                                 "/v1/stream?from=3", "/v1/stream/?conv_id=x"])
def test_get_without_id_is_400(harness, uri):
    path, _, query = uri.partition("?")
    result = harness.client.simulate_get(path, query_string=query)
    assert_error(result, 400, MISSING)


@pytest.mark.parametrize("uri", ["/v1/stream/nope", "/v1/stream?conv_id=nope",
                                 "/v1/stream/nope?from=abc"])
def test_get_unknown_is_404(harness, uri):
    path, _, query = uri.partition("?")
    assert_error(harness.client.simulate_get(path, query_string=query), 404, NOT_FOUND)


@pytest.mark.parametrize("value", ["+5", "%2B5", "%205", " 5", "5abc", "-1", "1.0", "0x5",
                                   "%EF%BC%95", "9223372036854775808",
                                   "99999999999999999999999"])
def test_get_invalid_from_is_400(harness, value):
    harness.session("s", b"abc", State.DONE).close()
    for uri in (f"/v1/stream/s?from={value}", f"/v1/stream?conv_id=s&from={value}"):
        path, _, query = uri.partition("?")
        result = harness.client.simulate_get(path, query_string=query)
        assert_error(result, 400, BAD_FROM)


@pytest.mark.parametrize(("query", "expected"), [
    ("", b"0123456789"), ("from=", b"0123456789"), ("from=0", b"0123456789"),
    ("from=3", b"3456789"), ("from=10", b""), ("from=9223372036854775807", b""),
    ("from=0003", b"3456789"), ("from=4&from=1", b"456789"),
])
def test_get_replays_from_offset(harness, query, expected):
    harness.session("done", b"0123456789", State.DONE).close()
    result = harness.client.simulate_get("/v1/stream/done", query_string=query)
    assert result.status_code == 200
    assert result.content == expected
    assert result.headers["content-type"] == "text/event-stream"
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"


def test_get_offset_lost_is_400(make_harness):
    harness = make_harness(capacity=64)
    harness.session("lost", bytes(range(100)), State.DONE).close()
    assert_error(harness.client.simulate_get("/v1/stream/lost", query_string="from=35"),
                 400, LOST)
    assert harness.client.simulate_get("/v1/stream/lost",
                                       query_string="from=36").content == bytes(range(36, 100))


@pytest.mark.parametrize(("conversation_id", "raw_uri"), [
    ("a/b::m", "/v1/stream/a%2Fb::m"),
    ("a/b::m", "/v1/stream/a%2Fb%3A%3Am"),
    ("a/b::org/model", "/v1/stream/a%2Fb%3A%3Aorg%2Fmodel"),
    ("100%", "/v1/stream/100%25"),
    ("a+b c", "/v1/stream/a+b%20c"),
    ("chat-é/💬", "/v1/stream/chat-%C3%A9%2F%F0%9F%92%AC"),
    ("a/b::m", "/v1/stream?conv_id=a%2Fb%3A%3Am"),
    ("a/b::m", "/v1/stream?from=0&conv_id=a/b::m"),
    ("chat-é", "/v1/stream?conv_id=chat-%C3%A9"),
])
def test_get_id_forms(harness, conversation_id, raw_uri):
    harness.session(conversation_id, b"data: x\n\n", State.DONE).close()
    result = harness.client.request("GET", raw_uri)
    assert result.status_code == 200
    assert result.content == b"data: x\n\n"


def test_get_id_from_a_decoded_path_without_raw_path(harness):
    harness.session("a/b%2F", b"ok", State.DONE).close()
    # A server that sends no raw_path leaves only the decoded path: taken as it is.
    result = harness.client.request("GET", "/v1/stream/a%2Fb%252F", raw_path=b"",
                                    path="/v1/stream/a/b%2F")
    assert result.status_code == 200 and result.content == b"ok"


@pytest.mark.parametrize("raw_uri", ["/v1/stream/%FF", "/v1/stream/%C3", "/v1/stream?conv_id=%FF"])
def test_get_id_not_utf8_is_400(harness, raw_uri):
    result = harness.client.request("GET", raw_uri)
    assert result.status_code == 400
    assert result.json == {"error": {
        "code": 400, "message": "Invalid conversation id: not valid UTF-8",
        "type": "invalid_request_error"}}


def test_get_follows_a_live_session_and_ends_when_it_does(harness):
    producer = harness.session("live", b"first ")
    call = harness.open("GET", "/v1/stream/live?from=2")
    assert call.status == 200 and call.headers["content-type"] == "text/event-stream"
    assert call.next() == b"rst "
    threading.Timer(0.1, producer.append, [b"second"]).start()
    assert call.next() == b"second"
    producer.finalize(State.DONE)
    assert call.rest() == b""
    assert call.finished.wait(5)
    producer.close()


def test_get_from_beyond_total_waits_for_the_stream(harness):
    producer = harness.session("ahead", b"0123")
    call = harness.open("GET", "/v1/stream/ahead?from=6")
    assert call.status == 200
    producer.append(b"45")
    producer.append(b"6789")
    producer.finalize(State.DONE)
    assert call.rest() == b"6789"
    producer.close()


def test_get_ends_when_the_reader_is_lapped(make_harness):
    harness = make_harness(capacity=64)
    producer = harness.session("lap", b"x" * 10)
    call = harness.open("GET", "/v1/stream/lap")
    assert call.next() == b"x" * 10
    producer.append(b"y" * 200)  # the bytes the reader needs next are gone
    assert call.rest() == b""
    producer.finalize(State.DONE)
    producer.close()


def test_reader_is_released_when_its_client_leaves_while_no_bytes_flow(harness):
    producer = harness.session("gone", b"hello")
    call = harness.open("GET", "/v1/stream/gone")
    assert call.next() == b"hello"
    assert not call.finished.wait(0.3)  # a silent session keeps its reader
    assert producer.info().waiters == 1  # this process's one waiter sleeps on the futex
    left = time.monotonic()
    call.disconnect()
    assert call.finished.wait(5)
    released = time.monotonic() - left
    assert released < 1.0, f"the reader took {released:.3f} s to go"  # ~0 (event-driven)
    assert call.error is None
    producer.append(b"more")  # nobody reads it: the waiter's readers are gone
    assert wait_until(lambda: waiter.hub().waiter_for(producer.segment) is None, 10)
    producer.finalize(State.DONE)
    producer.close()


def test_one_futex_waiter_wakes_every_local_reader_of_a_session(harness):
    """100 readers of one session in one process: one waiter thread, counted once in the
    header, and every reader gets every byte."""
    producer = harness.session("fan", b"a")
    calls = [harness.open("GET", "/v1/stream/fan") for _ in range(100)]
    assert all(call.next() == b"a" for call in calls)
    assert wait_until(lambda: producer.info().waiters == 1)
    assert waiter.hub().waiter_count() == 1
    single = waiter.hub().waiter_for(producer.segment)
    waits_before = single.waits
    for index in range(5):
        producer.append(b"%d" % index)
        assert all(call.next() == b"%d" % index for call in calls)
    assert single.waits - waits_before <= 6  # one futex wait per append, not one per reader
    assert producer.info().waiters <= 1
    producer.finalize(State.DONE)
    assert all(call.rest() == b"" for call in calls)
    producer.close()


# --- DELETE /v1/stream ---------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["/v1/stream/a%2Fb::m", "/v1/stream?conv_id=a%2Fb%3A%3Am"])
def test_delete_cancels_evicts_and_ends_readers(harness, uri):
    producer = harness.session("a/b::m", b"data: 1\n\n")
    reader = harness.open("GET", "/v1/stream/a%2Fb::m")
    assert reader.next() == b"data: 1\n\n"
    answer = harness.client.request("DELETE", uri)
    assert answer.status_code == 204 and answer.content == b""
    assert "content-type" not in answer.headers
    assert reader.rest() == b""  # ends cleanly, no [DONE]
    assert producer.producer_should_stop and producer.info().state is State.CANCELLED
    producer.close()
    assert_error(harness.client.simulate_get("/v1/stream/a%2Fb::m"),
                 404, NOT_FOUND)


@pytest.mark.parametrize("uri", ["/v1/stream/unknown", "/v1/stream?conv_id=unknown"])
def test_delete_unknown_or_finished_is_204(harness, uri):
    harness.session("finished", b"x", State.DONE).close()
    for target in (uri, "/v1/stream/finished"):
        result = harness.client.request("DELETE", target)
        assert result.status_code == 204 and result.content == b""


@pytest.mark.parametrize("uri", ["/v1/stream/", "/v1/stream", "/v1/stream?conv_id="])
def test_delete_without_id_is_400(harness, uri):
    assert_error(harness.client.request("DELETE", uri), 400, MISSING)


def test_other_methods_on_stream_paths_are_405(harness):
    result = harness.client.simulate_post("/v1/stream/x")
    assert result.status_code == 405
    assert result.headers["allow"] == "GET, DELETE"
    assert result.json["error"]["code"] == 405


# --- POST /v1/streams/lookup ---------------------------------------------------------------


def test_lookup_finds_exact_and_model_variants(harness):
    harness.session("chat1", b"abc", State.DONE).close()
    running = harness.session("chat1::org/model", b"abcdef")
    harness.session("chat10", b"x").close()
    result = harness.client.simulate_post(
        "/v1/streams/lookup", json={"conversation_ids": ["chat1", 7, "", None, "zzz"]})
    assert result.status_code == 200
    assert result.headers["content-type"] == JSON_TYPE
    entries = sorted(result.json, key=lambda e: e["conversation_id"])
    assert [e["conversation_id"] for e in entries] == ["chat1", "chat1::org/model"]
    done, live = entries
    assert list(done)[:5] == ["conversation_id", "is_done", "total_bytes", "started_at",
                              "completed_at"]
    assert done["is_done"] is True and done["total_bytes"] == 3 and done["completed_at"] > 0
    assert live["is_done"] is False and live["total_bytes"] == 6 and live["completed_at"] == 0
    assert isinstance(live["started_at"], int) and live["state"] == "running"
    running.finalize(State.DONE)
    running.close()


@pytest.mark.parametrize("body", [
    {}, {"conversation_ids": "chat1"}, {"conversation_ids": None}, [], "x", 5,
    {"conversation_ids": []}, {"conversation_ids": [1, {}, ""]}, {"other": ["chat1"]},
])
def test_lookup_ignores_what_is_not_a_list_of_ids(harness, body):
    harness.session("chat1", b"abc", State.DONE).close()
    result = harness.client.simulate_post("/v1/streams/lookup", json=body)
    assert result.status_code == 200 and result.json == []


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe"])
def test_lookup_non_json_body_is_400(harness, raw):
    result = harness.client.simulate_post("/v1/streams/lookup", body=raw)
    assert result.status_code == 400 and result.headers["content-type"] == JSON_TYPE
    error = result.json["error"]
    assert set(error) == {"code", "message", "type"}
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert error["message"].startswith("invalid body: ")


def test_lookup_wrong_method_is_405_in_the_error_shape(harness):
    result = harness.client.simulate_get("/v1/streams/lookup")
    assert result.status_code == 405 and result.headers["content-type"] == JSON_TYPE
    assert result.json == {"error": {"code": 405, "message": "405 Method Not Allowed",
                                     "type": "invalid_request_error"}}


# --- completions ---------------------------------------------------------------------------


def test_streamed_completion_becomes_a_session(harness, upstream_server):
    result = harness.client.simulate_post(
        "/v1/chat/completions", json=chat({"tag": "app1", "events": 12}, model="m1"),
        headers={"X-Conversation-Id": "conv/1::m1"})
    assert result.status_code == 200
    assert result.headers["content-type"] == "text/event-stream"
    assert result.headers["cache-control"] == "no-cache"
    assert result.content == expected_body("app1", 12)
    replay = harness.client.request("GET", "/v1/stream/conv%2F1%3A%3Am1?from=0")
    assert replay.content == result.content
    [entry] = harness.store.lookup(["conv/1"])
    assert entry.state is State.DONE and entry.metadata["model"] == "m1"
    headers = upstream_server.record("app1").headers
    assert "x-conversation-id" not in headers  # the session is shmstream's (rule 2)
    assert headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/chat/completions",
                                   "/v1/completions", "/completions", "/completion",
                                   "/v1/responses", "/responses", "/v1/messages",
                                   "/infill"])
def test_every_completion_route_makes_sessions(harness, route):
    result = harness.client.simulate_post(route, json=chat({"tag": route, "events": 2}),
                                          headers={"x-conversation-id": "r" + route})
    assert result.content == expected_body(route, 2)
    assert harness.store.lookup(["r" + route])[0].total_bytes == len(result.content)


def test_a_reader_attached_during_prompt_processing_gets_200_and_pings(harness):
    answers = {}

    def post():
        answers["result"] = harness.client.simulate_post(
            "/v1/chat/completions", json=chat({"tag": "pp", "events": 2, "stall_before": 0.5}),
            headers={"X-Conversation-Id": "pp"})

    poster = threading.Thread(target=post)
    poster.start()
    wait_for(lambda: harness.store.get("pp"))
    call = harness.open("GET", "/v1/stream/pp")
    assert call.status == 200
    assert call.next() == PING
    rest = call.rest()
    poster.join(5)
    caller = answers["result"].content
    assert caller == PING + rest and caller.startswith(PING * 3)
    assert caller.replace(PING, b"") == expected_body("pp", 2)


def test_a_caller_that_leaves_during_prompt_processing_is_let_go_and_the_answer_goes_on(harness):
    # The wait for the upstream's answer ends the moment the client leaves (PROTOCOL.md
    # rule 4: leaving never cancels), and the session gets the whole answer.
    call = harness.client.open("POST", "/v1/chat/completions",
                               {"X-Conversation-Id": "leaver"},
                               json=chat({"tag": "leaver", "events": 3, "stall_before": 30}))
    assert wait_for(lambda: harness.store.get("leaver"))
    assert not call.finished.wait(0.2)  # waiting for the upstream's answer
    call.disconnect()
    assert call.finished.wait(5), "the request outlived its client"
    assert call.error is None
    session = harness.store.get("leaver")
    with session:
        assert session.info().state is State.RUNNING  # the generation goes on


def test_upstream_error_reaches_the_caller_unchanged_and_the_session(harness):
    error = {"error": {"code": 400, "message": "too long", "type": "exceed_context_size_error"}}
    result = harness.client.simulate_post(
        "/v1/chat/completions", json=chat({"status": 400, "error_body": error}),
        headers={"X-Conversation-Id": "err"})
    assert result.status_code == 400
    assert result.json == error and result.headers["content-type"] == "application/json"
    replay = harness.client.simulate_get("/v1/stream/err")
    # pings may come first (the session pings from its first moment, rule 5)
    event = b"data: " + json.dumps({"error": error["error"]}).encode() + b"\n\n"
    assert replay.content.replace(PING, b"") == event
    assert harness.store.lookup(["err"])[0].state is State.FAILED


@pytest.mark.parametrize(("body", "headers"), [
    (chat({"tag": "p1"}), {}),
    (chat({"tag": "p2"}), {"X-Conversation-Id": ""}),
    (chat({"tag": "p3"}, stream=False), {"X-Conversation-Id": "p3"}),
    ({**chat({"tag": "p4"}), "stream": "true"}, {"X-Conversation-Id": "p4"}),
])
def test_completion_without_id_or_stream_is_proxied_unchanged(harness, body, headers):
    result = harness.client.simulate_post("/v1/chat/completions", json=body, headers=headers)
    assert result.status_code == 200
    if body["stream"] is True:
        assert result.content == expected_body(body["script"]["tag"], 10)
    assert harness.store.list() == []


def test_non_json_completion_is_proxied(harness):
    result = harness.client.simulate_post("/v1/chat/completions", body=b"{oops",
                                          headers={"X-Conversation-Id": "nj"})
    assert result.status_code == 200 and result.json["body_length"] == 5
    assert harness.store.list() == []


def test_completion_id_not_utf8_is_400(harness):
    result = harness.client.simulate_post("/v1/chat/completions", json=chat(),
                                          headers={"X-Conversation-Id": "\xff"})
    assert result.status_code == 400
    assert result.json["error"]["message"] == "Invalid conversation id: not valid UTF-8"


def test_completion_id_is_utf8_from_latin1_header(harness):
    raw = "chat-é::m".encode().decode("latin-1")  # how WSGI hands the header over
    result = harness.client.simulate_post("/v1/chat/completions", json=chat({"events": 1}),
                                          headers={"X-Conversation-Id": raw})
    assert result.status_code == 200
    assert [i.conversation_id for i in harness.store.lookup(["chat-é"])] == ["chat-é::m"]


def test_a_replacing_request_cancels_the_running_one(harness, upstream_server):
    first = {}

    def post():
        first["result"] = harness.client.simulate_post(
            "/v1/chat/completions", json=chat({"tag": "rep1", "events": 3, "stall_at": 1,
                                               "stall": 30}),
            headers={"X-Conversation-Id": "rep"})

    poster = threading.Thread(target=post)
    poster.start()
    deadline = time.monotonic() + 5
    while (record := upstream_server.record("rep1")) is None or record.events_sent < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = harness.client.simulate_post(
        "/v1/chat/completions", json=chat({"tag": "rep2", "events": 2}),
        headers={"X-Conversation-Id": "rep"})
    poster.join(5)
    assert not poster.is_alive()
    assert first["result"].content == expected_body("rep1", 1, done=False)
    assert second.content == expected_body("rep2", 2)
    deadline = time.monotonic() + 2
    while upstream_server.record("rep1").closed_at is None:
        assert time.monotonic() < deadline, "the replaced upstream call stayed open"
        time.sleep(0.01)


def test_store_full_is_503(make_harness):
    harness = make_harness(max_sessions=0)
    result = harness.client.simulate_post("/v1/chat/completions", json=chat(),
                                          headers={"X-Conversation-Id": "full"})
    assert result.status_code == 503 and result.headers["content-type"] == JSON_TYPE
    assert result.json["error"]["type"] == "unavailable_error"
    assert result.json["error"]["code"] == 503


# --- the transparent proxy -----------------------------------------------------------------


def test_proxy_relays_method_target_and_headers(harness):
    result = harness.client.simulate_request(
        "PATCH", "/props", query_string="a=1&b=%2F", body=b"payload",
        headers={"Connection": "keep-alive, X-Secret", "X-Secret": "1", "X-Keep": "2",
                 "Authorization": "Bearer client", "Content-Type": "text/plain"},
        remote_addr="10.1.2.3")
    echo = result.json
    assert echo["method"] == "PATCH" and echo["target"] == "/props?a=1&b=%2F"
    assert echo["body_length"] == 7
    assert echo["headers"]["x-keep"] == "2"
    assert echo["headers"]["authorization"] == "Bearer client"
    assert echo["headers"]["x-forwarded-for"] == "10.1.2.3"
    assert "x-secret" not in echo["headers"]
    assert echo["headers"]["host"] != "falconframework.org"


def test_proxy_keeps_the_raw_path(harness):
    result = harness.client.request("GET", "/files/a%2Fb%20c?x=%41")
    assert result.json["target"] == "/files/a%2Fb%20c?x=%41"


def test_proxy_replaces_authorization_with_the_upstream_key(make_harness):
    harness = make_harness(upstream_api_key="upkey")
    result = harness.client.simulate_get("/v1/models", headers={"Authorization": "Bearer c"})
    assert result.json["headers"]["authorization"] == "Bearer upkey"


def test_proxy_relays_status_and_response_headers(harness):
    result = harness.client.simulate_get("/_test/status/418")
    assert result.status_code == 418 and result.json == {"status": 418}
    assert result.headers["x-upstream"] == "yes"
    assert "x-hop" not in result.headers and "keep-alive" not in result.headers
    assert [c.split(";")[0] for c in result.all("set-cookie")] == ["a=1", "b=2"]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("HEAD", "/anything", 200), ("GET", "/_test/status/204", 204),
    ("GET", "/_test/status/304", 304),
])
def test_proxy_bodiless_answers(harness, method, path, status):
    result = harness.client.simulate_request(method, path)
    assert result.status_code == status and result.content == b""


def test_proxy_streams_the_request_body(harness):
    payload = bytes(range(256)) * 1000
    pieces = [payload[i:i + 65536] for i in range(0, len(payload), 65536)]
    result = harness.client.request("POST", "/upload", body=pieces,
                                    headers={"transfer-encoding": "chunked"})
    echo = result.json
    assert echo["body_length"] == len(payload)
    assert echo["headers"]["transfer-encoding"] == "chunked"
    sized = harness.client.request("POST", "/upload", body=payload).json
    assert sized["body_length"] == len(payload)
    assert sized["headers"]["content-length"] == str(len(payload))
    assert "transfer-encoding" not in sized["headers"]


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
def test_proxy_sends_a_request_without_a_body_without_one(harness, method):
    """A GET reached the upstream with Transfer-Encoding: chunked and an empty body."""
    echo = harness.client.request(method, "/v1/models").json
    assert echo["method"] == method and echo["body_length"] == 0
    assert "transfer-encoding" not in echo["headers"]
    assert "content-length" not in echo["headers"]


def test_proxy_streams_the_response_body(harness):
    call = harness.open("GET", "/_test/drip?n=3&interval=0.2")
    assert call.next() == b"drip 0\n"
    assert not call.finished.is_set()  # the first piece came before the last was sent
    assert call.rest() == b"drip 1\ndrip 2\n"


def test_proxy_stops_relaying_when_the_client_leaves(harness):
    call = harness.open("GET", "/_test/drip?n=1000&interval=0.05")
    assert call.next() == b"drip 0\n"
    call.disconnect()
    assert call.finished.wait(5)  # the upstream response was closed, not read to its end


def test_proxy_to_an_unreachable_upstream_is_502(make_harness):
    harness = make_harness(upstream=HttpAsyncUpstream("http://127.0.0.1:9"))
    result = harness.client.simulate_get("/v1/models")
    assert result.status_code == 502 and result.headers["content-type"] == JSON_TYPE
    assert result.json["error"]["type"] == "server_error"


# --- errors and the API key ----------------------------------------------------------------


def test_unexpected_errors_use_the_error_shape(harness, monkeypatch):
    def broken(ids):
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.store, "lookup", broken)
    result = harness.client.simulate_post("/v1/streams/lookup", json={"conversation_ids": ["x"]})
    assert_error(result, 500, b'{"error": {"code": 500, "message": "Internal server error", '
                              b'"type": "server_error"}}')


def test_api_key(make_harness):
    harness = make_harness(api_key="sekret")
    unauthorized = (b'{"error": {"code": 401, "message": "Invalid API Key", '
                    b'"type": "authentication_error"}}')
    assert_error(harness.client.simulate_get("/v1/stream/x"), 401, unauthorized)
    assert_error(harness.client.simulate_delete(
        "/v1/stream/x", headers={"Authorization": "Bearer wrong"}), 401, unauthorized)
    assert harness.client.simulate_get(
        "/v1/stream/x", headers={"Authorization": "Bearer sekret"}).status_code == 404
    assert harness.client.simulate_get(
        "/v1/stream/x", headers={"X-Api-Key": "sekret"}).status_code == 404
    assert harness.client.simulate_get("/health").status_code == 200
    assert harness.client.simulate_get("/v1/models").status_code == 200
    assert harness.client.simulate_post("/v1/chat/completions", json=chat()).status_code == 401


# --- the demo upstream ---------------------------------------------------------------------


@pytest.fixture
def demo(make_harness):
    return make_harness(upstream=AsyncDemoUpstream(tokens_per_second=500))


def test_demo_models_and_health(demo):
    models = demo.client.simulate_get("/v1/models").json
    assert [m["id"] for m in models["data"]] == [DEMO_MODEL]
    assert "demo" in models["data"][0]["owned_by"]
    health = demo.client.simulate_get("/health").json
    assert health["status"] == "ok" and health["upstream"]["health"] == {"status": "ok"}
    assert demo.client.simulate_get("/nope").status_code == 404


def test_demo_chat_streams_deterministic_text(demo):
    body = {"stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    texts = []
    for index in range(2):
        result = demo.client.simulate_post("/v1/chat/completions", json=body,
                                           headers={"X-Conversation-Id": f"d{index}"})
        events = [json.loads(line[6:]) for line in result.text.split("\n\n")
                  if line.startswith("data: {")]
        texts.append("".join(e["choices"][0]["delta"].get("content", "") for e in events))
        assert result.text.endswith("data: [DONE]\n\n")
    assert texts[0] == texts[1] == "".join(demo_words(json.dumps(body["messages"],
                                                                 sort_keys=True), 8))


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/chat/completions",
                                   "/v1/completions", "/completions", "/completion",
                                   "/v1/responses", "/v1/messages", "/infill"])
def test_demo_answers_every_completion_route(demo, route):
    body = {"max_tokens": 4, "prompt": "p", "messages": [{"role": "user", "content": "p"}]}
    streamed = demo.client.simulate_post(route, json={**body, "stream": True},
                                         headers={"X-Conversation-Id": route})
    assert streamed.status_code == 200 and streamed.text.count("data: ") >= 4
    whole = demo.client.simulate_post(route, json={**body, "stream": False})
    assert whole.status_code == 200 and "This is the shmstream" in whole.text


def test_demo_paces_tokens_and_stops_on_delete(make_harness):
    harness = make_harness(upstream=AsyncDemoUpstream(tokens_per_second=20))
    body = {"stream": True, "max_tokens": 1000, "messages": []}
    call = harness.open("POST", "/v1/chat/completions", json=body,
                        headers={"X-Conversation-Id": "pace"})
    assert call.status == 200
    started = time.monotonic()
    received = b""
    while received.count(b"data: ") < 6:
        received += call.next()
    assert 0.15 < time.monotonic() - started < 1.5  # 5 tokens at 20/s
    assert harness.client.request("DELETE", "/v1/stream/pace").status_code == 204
    call.rest()
    assert wait_until(lambda: not harness.relay.server.producers, 5)


def test_asgi_module_builds_nothing_before_the_first_call(namespace):
    code = (
        "import threading, os, sys\n"
        "import shmstream.serve.asgi as w\n"
        "assert w._app is None and threading.active_count() == 1\n"
        "assert not [n for n in os.listdir('/dev/shm') if n.startswith(os.environ["
        "'SHMSTREAM_NAMESPACE'])]\n"
        "import falcon.testing\n"
        "result = falcon.testing.TestClient(w.application).simulate_get('/v1/models')\n"
        "assert result.status_code == 200 and b'shmstream-demo' in result.content\n"
        "assert w.get_app() is w._app\n"
    )
    env = {"SHMSTREAM_NAMESPACE": namespace, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "built-in demo" in result.stderr


def test_the_protocol_on_every_backend(store_factory, upstream_server):
    """The HTTP layer uses only the SessionStore interface: the same answers on each."""
    store = store_factory(capacity=4096)
    settings = Settings(namespace=store_factory.namespace, upstream=upstream_server.url,
                        ping_interval=0.1)
    harness = Harness(store, settings, HttpAsyncUpstream(upstream_server.url))
    try:
        tag = f"backend-{store_factory.backend}"
        result = harness.client.simulate_post(
            "/v1/chat/completions", json=chat({"tag": tag, "events": 60, "pad": 40}),
            headers={"X-Conversation-Id": "b/1::m"})
        assert result.status_code == 200
        assert result.content == expected_body(tag, 60, 40)  # longer than the 4096 B ring
        [entry] = harness.client.simulate_post(
            "/v1/streams/lookup", json={"conversation_ids": ["b/1"]}).json
        assert entry["is_done"] and entry["total_bytes"] == len(result.content)
        dropped = entry["dropped_bytes"]
        assert dropped == len(result.content) - 4096
        uri = "/v1/stream/b%2F1::m"
        assert_error(harness.client.simulate_get(uri, query_string=f"from={dropped - 1}"),
                     400, LOST)
        replay = harness.client.simulate_get(uri, query_string=f"from={dropped}")
        assert replay.content == result.content[dropped:]
        deleted = harness.client.request("DELETE", "/v1/stream?conv_id=b%2F1%3A%3Am")
        assert deleted.status_code == 204 and deleted.content == b""
        assert_error(harness.client.simulate_get(uri), 404, NOT_FOUND)
    finally:
        harness.close()


def test_proxy_re_encodes_a_decoded_path(harness):
    result = harness.client.request("GET", "/files/a b%25?x=1", raw_path=b"",
                                    path="/files/a b%")
    assert result.json["target"] == "/files/a%20b%25?x=1"


def test_favicon_is_ours_when_the_upstream_has_none(demo, harness):
    for app in (demo, harness):  # the demo has no icon; the scripted upstream echoes 200
        result = app.client.request("GET", "/favicon.ico")
        assert result.status_code == 200
    ours = demo.client.request("GET", "/favicon.ico")
    assert ours.headers["content-type"] == "image/svg+xml" and ours.content.startswith(b"<svg")
    page = demo.client.request("GET", "/shmstream/").text
    assert '<link rel="icon" href="favicon.svg"' in page


def test_an_error_log_names_the_lookup_path_as_it_is(harness, monkeypatch, caplog):
    def broken(ids):
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.store, "lookup", broken)
    harness.client.request("POST", "/v1/streams/lookup", json={"conversation_ids": ["x"]})
    lines = [r.getMessage() for r in caplog.records if "unhandled error" in r.getMessage()]
    assert lines == ["unhandled error on POST /v1/streams/lookup"]
