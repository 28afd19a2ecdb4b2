"""Relay processes under a real gunicorn master (shmstream's hooks), driven through the
hand-off socket with the HTTP workers' own client: reloads, stops, kills and cancels, on
both backends. The scripted upstream is a real process that records when its client hung up.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import threading
import time

import httpx
import pytest
from polling import wait_for, wait_until
from service import Service
from sse_upstream import expected_body

from shmstream.relay.handoff import RelayClient, RelayRequest
from shmstream.shm.store import ShmStore
from shmstream.store.states import State

pytestmark = pytest.mark.slow
PING = b":\n\n"
GRACEFUL = 3.0  # SHMSTREAM_GRACEFUL_TIMEOUT in these tests


@pytest.fixture(params=["shm", "redis"])
def backend(request, namespace):
    """(settings for Service, a store factory for this test process)."""
    if request.param == "shm":
        return {}, lambda: ShmStore(namespace)
    from shmstream.redis.store import RedisStore

    url = request.getfixturevalue("redis_stores").url
    return {"backend": url}, lambda: RedisStore.from_url(url, namespace=namespace)


@pytest.fixture
def service(namespace, tmp_path, upstream, backend):
    settings, _ = backend
    directory = tempfile.mkdtemp(prefix="ss-")  # a unix socket path must stay short
    server = Service(namespace, upstream.url, str(tmp_path), workers=1,
                     relay_socket=os.path.join(directory, "relay.sock"), **settings)
    server.relay_socket = server.env["SHMSTREAM_RELAY_SOCKET"]
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def store(backend):
    store = backend[1]()
    yield store
    store.close()


def relay_pids(service: Service) -> set[int]:
    master = service.process.pid
    pids = []
    for task in os.listdir(f"/proc/{master}/task"):  # children of every thread: restarts
        with open(f"/proc/{master}/task/{task}/children") as listing:  # come from a watcher
            pids += [int(pid) for pid in listing.read().split()]
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"shmstream.serve.relays" in cmdline.read():
                    found.add(pid)
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def hand_off(service: Service, conversation_id: str, script: dict) -> None:
    """Submit a completion as an HTTP worker does, wait for the status line, then leave."""
    body = json.dumps({"stream": True, "script": script}).encode()
    request = RelayRequest(conversation_id, "POST", "/v1/chat/completions",
                           [("content-type", "application/json")], body, {"model": "m"})

    async def go():
        ticket = await RelayClient(service.relay_socket, submit_timeout=20).submit(request)
        answer = await ticket.answer()
        assert answer.status == 200 and answer.body is None
    asyncio.run(go())


def upstream_record(upstream, tag: str) -> dict | None:
    answer = httpx.get(upstream.url + "/_test/log", params={"tag": tag}, timeout=5)
    return answer.json() if answer.status_code == 200 else None


class Reader:
    """A reader of the session in this process, from offset 0, in a thread."""

    def __init__(self, store, conversation_id: str):
        self.session = wait_for(lambda: store.get(conversation_id))
        self.received = bytearray()
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for chunk in self.session.read(0):
                self.received += chunk
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout: float) -> bytes:
        self.thread.join(timeout)
        assert self.ended_at is not None, "the reader still waits"
        self.session.close()
        return bytes(self.received)


def final_info(store, conversation_id: str, timeout: float = 20.0):
    def ended():
        session = store.get(conversation_id)
        if session is None:
            return None
        with session:
            info = session.info()
        return info if info.state.is_terminal else None
    return wait_for(ended, timeout=timeout)


def test_sighup_renews_the_relays_and_the_answer_in_flight_completes(service, store,
                                                                     upstream):
    (old_relay,) = wait_for(lambda: relay_pids(service))
    hand_off(service, "hup", {"tag": "hup", "events": 60, "interval": 0.05})
    service.process.send_signal(signal.SIGHUP)
    new_relays = wait_for(lambda: relay_pids(service) - {old_relay}, timeout=20)
    # the old relay retires once the new one accepts
    wait_for(lambda: f"relay pid {old_relay}: retiring" in service.log_text(), timeout=20)
    assert alive(old_relay)  # still finishing its answer, accepting nothing new
    hand_off(service, "after-hup", {"tag": "after-hup", "events": 2})
    with store.get("after-hup") as session:
        assert session.info().producer_pid in new_relays

    info = final_info(store, "hup")
    assert info.state is State.DONE and info.producer_pid == old_relay
    with store.get("hup") as session:
        assert b"".join(session.read(0)).replace(PING, b"") == expected_body("hup", 60)
    assert upstream_record(upstream, "hup")["finished"]
    assert wait_until(lambda: not alive(old_relay), timeout=10), "the old relay stays"
    assert "died" not in service.log_text()


def test_sigterm_lets_the_answer_finish_for_its_reader_then_everything_exits(service, store):
    relays = wait_for(lambda: relay_pids(service))
    hand_off(service, "term", {"tag": "term", "events": 30, "interval": 0.05})  # 1.5 s
    reader = Reader(store, "term")
    service.process.send_signal(signal.SIGTERM)
    service.process.wait(GRACEFUL + 10)
    assert reader.join(5).replace(PING, b"") == expected_body("term", 30)
    assert final_info(store, "term").state is State.DONE
    assert not any(alive(pid) for pid in relays)
    log = service.log_text()
    assert "died" not in log and "restart" not in log.lower()


def test_sigterm_past_the_graceful_timeout_aborts_what_still_runs(service, store):
    hand_off(service, "long", {"tag": "long", "events": 1000, "interval": 0.05})
    reader = Reader(store, "long")
    service.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    service.process.wait(GRACEFUL + 10)
    data = reader.join(5)
    assert reader.ended_at - signalled < GRACEFUL + 3
    assert final_info(store, "long").state is State.ABORTED
    assert expected_body("long", 1000).startswith(data.replace(PING, b""))


def test_sigint_aborts_at_once(service, store):
    hand_off(service, "int", {"tag": "int", "events": 1000, "interval": 0.05})
    reader = Reader(store, "int")
    service.process.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    service.process.wait(10)
    reader.join(5)
    assert reader.ended_at - signalled < GRACEFUL
    assert final_info(store, "int").state is State.ABORTED


def test_sigkill_of_a_relay_aborts_only_its_sessions_and_a_new_relay_starts(
        service, store, upstream):
    (relay,) = wait_for(lambda: relay_pids(service))
    hand_off(service, "victim", {"tag": "victim", "events": 1000, "interval": 0.05})
    reader = Reader(store, "victim")
    wait_for(lambda: len(reader.received) > 0)
    os.kill(relay, signal.SIGKILL)
    killed = time.monotonic()
    reader.join(10)
    ended_after = reader.ended_at - killed
    print(f"reader ended {ended_after * 1000:.0f} ms after the relay's SIGKILL")
    assert ended_after < 2.0  # the goal is 1 s; generous on a loaded machine
    assert final_info(store, "victim").state is State.ABORTED
    record = wait_for(lambda: (r := upstream_record(upstream, "victim")) and r["closed_at"]
                      and r)
    assert not record["finished"] and record["events_sent"] < 1000
    replacement = wait_for(lambda: relay_pids(service) - {relay}, timeout=20)
    hand_off(service, "next", {"tag": "next", "events": 3})
    info = final_info(store, "next")
    assert info.state is State.DONE and info.producer_pid in replacement
    assert "starting a new one" in service.log_text()


def test_cancel_from_another_process_closes_the_upstream(service, store, upstream):
    hand_off(service, "stop", {"tag": "stop", "events": 5, "stall_at": 1, "stall": 30})
    wait_for(lambda: (r := upstream_record(upstream, "stop")) and r["events_sent"] == 1)
    cancelled = time.time()
    assert store.evict_and_cancel("stop")
    closed = wait_for(lambda: (upstream_record(upstream, "stop") or {}).get("closed_at"))
    latency = closed - cancelled
    print(f"upstream closed {latency * 1000:.0f} ms after the cancel")
    assert latency < 1.0  # the goal is 250 ms; generous on a loaded machine


def children_matching(service: Service, marker: bytes) -> set[int]:
    master = service.process.pid
    found = set()
    for task in os.listdir(f"/proc/{master}/task"):
        with open(f"/proc/{master}/task/{task}/children") as listing:
            for pid in (int(p) for p in listing.read().split()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                        if marker in cmdline.read():
                            found.add(pid)
                except OSError:
                    continue
    return found


@pytest.mark.parametrize("round_", range(3))
def test_sigterm_to_the_whole_service_at_once_restarts_nothing(service, round_):
    # systemd's default stop sends SIGTERM to every process of the unit at the same time:
    # the children exit first, and the master must not take that for a death (issue 14.5).
    children = wait_for(lambda: (s := children_matching(service, b"supervise"))
                        and (r := relay_pids(service)) and s | r)
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    # The master gets to its handler a little later (a busy master, a slow delivery):
    # the children are gone by then, within the settle time the watchers allow.
    time.sleep(0.45)  # the scenario, not a synchronisation: watcher passes see them dead
    service.process.send_signal(signal.SIGTERM)
    service.process.wait(GRACEFUL + 10)
    log = service.log_text()
    assert "died" not in log and "restarting" not in log and "starting a new one" not in log
    assert "started supervisor" in log and log.count("started supervisor") == 1


def test_several_relays_share_the_answers_and_each_is_read_whole_through_any_worker(
        namespace, tmp_path, upstream):
    """The default on a machine with several CPUs: relays accept from one socket, so any of
    them may produce a conversation; every answer is whole through the HTTP workers, and
    a cancel through a worker reaches whichever relay produces it."""
    directory = tempfile.mkdtemp(prefix="ss-")
    server = Service(namespace, upstream.url, str(tmp_path), workers=2, relays=2,
                     relay_socket=os.path.join(directory, "relay.sock"))
    server.relay_socket = server.env["SHMSTREAM_RELAY_SOCKET"]
    server.start()
    store = ShmStore(namespace)
    try:
        relays = wait_for(lambda: (pids := relay_pids(server)) and len(pids) == 2 and pids,
                          timeout=20)
        count = 12

        def complete(index: int) -> bytes:
            body = {"stream": True, "script": {"tag": f"many-{index}", "events": 20,
                                               "interval": 0.02}}
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                              headers={"X-Conversation-Id": f"many-{index}"},
                              timeout=30) as answer:
                assert answer.status_code == 200
                return b"".join(answer.iter_bytes()).replace(PING, b"")

        results: dict[int, bytes] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, complete(i)))
                   for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert {i: results.get(i) for i in range(count)} == {
            i: expected_body(f"many-{i}", 20) for i in range(count)}
        producers = {final_info(store, f"many-{i}").producer_pid for i in range(count)}
        assert producers <= relays, "an answer was produced outside the relays"
        print(f"{count} answers produced by {len(producers)} of {len(relays)} relays")

        hand_off(server, "cut", {"tag": "cut", "events": 1000, "interval": 0.05})
        with store.get("cut") as session:
            assert session.info().producer_pid in relays
        assert httpx.delete(server.url + "/v1/stream/cut", timeout=10).status_code == 204
        record = wait_for(lambda: (r := upstream_record(upstream, "cut")) and r["closed_at"]
                          and r, timeout=10)
        assert not record["finished"]  # the producing relay hung up on the upstream
    finally:
        store.close()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
