"""The process model under faults, through a real gunicorn: a SIGKILLed worker, a SIGHUP
reload and a SIGTERM shutdown (gunicorn_hooks + supervisor)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import pytest
from polling import wait_for, wait_until
from service import Service
from sse_upstream import expected_body

from shmstream.shm.store import ShmStore
from shmstream.store.states import State

pytestmark = pytest.mark.slow
PING = b":\n\n"


@pytest.fixture
def service(namespace, tmp_path, upstream):
    server = Service(namespace, upstream.url, str(tmp_path), workers=3).start()
    yield server
    server.stop()


def chat(tag: str, events: int, interval: float) -> dict:
    return {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "script": {"tag": tag, "events": events, "interval": interval}}


def start_generation(service: Service, conversation_id: str, tag: str, events: int,
                     interval: float) -> None:
    """POST a streamed completion and return once its first bytes arrived (the caller's
    connection is dropped; the generation goes on in its producer)."""
    with httpx.Client(timeout=10) as client, client.stream(
        "POST", service.url + "/v1/chat/completions", json=chat(tag, events, interval),
        headers={"X-Conversation-Id": conversation_id},
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            if b"data: " in chunk:
                return


def serving_pid(client: socket.socket, candidates: list[int]) -> int | None:
    """Which of ``candidates`` (worker pids) holds the server side of ``client``: the
    kernel's socket table names the inode, each process's fd table names its sockets."""
    local_port = client.getsockname()[1]
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == local_port and int(fields[1].split(":")[1], 16) != local_port:
                inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in candidates:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def worker_pids(service: Service) -> list[int]:
    """The master's children but the supervisor (a fresh interpreter, not a fork)."""
    children = f"/proc/{service.process.pid}/task/{service.process.pid}/children"
    with open(children) as listing:
        pids = [int(pid) for pid in listing.read().split()]
    workers = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"supervise" in cmdline.read():
                    continue
        except OSError:
            continue
        workers.append(pid)
    return workers


class RawReader:
    """``GET /v1/stream/<id>?from=0`` on a raw socket, read to the end in a thread."""

    def __init__(self, service: Service, conversation_id: str):
        self.socket = socket.create_connection(("127.0.0.1", service.port), timeout=15)
        request = (f"GET /v1/stream/{conversation_id}?from=0 HTTP/1.1\r\n"
                   f"Host: x\r\nConnection: close\r\n\r\n").encode()
        self.socket.sendall(request)
        self.received = bytearray()
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        try:
            while chunk := self.socket.recv(65536):
                self.received += chunk
        except OSError:
            pass
        self.ended_at = time.monotonic()

    @property
    def clean_end(self) -> bool:
        return bytes(self.received).endswith(b"\r\n0\r\n\r\n")

    def close(self) -> None:
        self.socket.close()


def sse_bytes(service: Service, conversation_id: str) -> bytes:
    answer = httpx.get(f"{service.url}/v1/stream/{conversation_id}", params={"from": 0},
                       timeout=10)
    assert answer.status_code == 200
    return answer.content


def lookup(service: Service, conversation_id: str) -> dict:
    answer = httpx.post(service.url + "/v1/streams/lookup",
                        json={"conversation_ids": [conversation_id]}, timeout=10)
    (entry,) = answer.json()
    return entry


def test_sigkill_of_the_producing_worker_ends_readers_on_other_workers(service, namespace):
    start_generation(service, "kill-me", "kill", events=400, interval=0.02)
    info = ShmStore(namespace).get("kill-me").info()
    producer = info.producer_pid
    workers = worker_pids(service)
    assert producer in workers

    reader = None
    for _ in range(30):  # connections land on workers as they accept: find another one
        candidate = RawReader(service, "kill-me")
        # A connection still in the listen backlog has no worker yet: try another one.
        accepted = wait_until(lambda c=candidate: serving_pid(c.socket, workers), timeout=2)
        if accepted and serving_pid(candidate.socket, workers) != producer:
            reader = candidate
            break
        candidate.close()
    assert reader is not None, "no connection landed on a non-producing worker"
    reader.thread.start()
    time.sleep(0.2)

    os.kill(producer, signal.SIGKILL)
    killed_at = time.monotonic()
    reader.thread.join(10)
    assert reader.ended_at is not None, "the reader on another worker still hangs"
    ended_after = reader.ended_at - killed_at
    assert ended_after < 2.0, f"reader ended {ended_after:.2f} s after the kill"
    assert reader.clean_end
    reader.close()

    body = sse_bytes(service, "kill-me")
    events = body.replace(PING, b"")
    assert events and expected_body("kill", 400).startswith(events)
    entry = lookup(service, "kill-me")
    assert entry["is_done"] is True and entry["state"] == "aborted"
    assert entry["total_bytes"] == len(body)


def test_sighup_reload_keeps_finished_sessions_byte_identical(service, namespace):
    start_generation(service, "finished", "fin", events=20, interval=0.001)
    wait_for(lambda: lookup(service, "finished")["is_done"])
    before = sse_bytes(service, "finished")
    start_generation(service, "running", "run", events=100, interval=0.02)
    old_workers = set(worker_pids(service))

    service.process.send_signal(signal.SIGHUP)
    wait_for(lambda: len(set(worker_pids(service)) - old_workers) == 3, timeout=20)
    wait_for(lambda: not set(worker_pids(service)) & old_workers, timeout=20)

    assert sse_bytes(service, "finished") == before
    entry = wait_for(lambda: (e := lookup(service, "running"))["is_done"] and e, timeout=20)
    assert entry["state"] in ("done", "aborted")  # done if it ended within the grace period
    replay = sse_bytes(service, "running").replace(PING, b"")
    assert expected_body("run", 100).startswith(replay)


def test_sigterm_exits_within_the_graceful_timeout_and_ends_readers(service, namespace):
    start_generation(service, "long", "long", events=1000, interval=0.05)
    reader = RawReader(service, "long")
    reader.thread.start()
    time.sleep(0.3)

    service.process.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    service.process.wait(3 + 5)  # graceful timeout is 3 s in tests
    exited_after = time.monotonic() - signalled_at
    reader.thread.join(5)
    assert reader.ended_at is not None, "a client hangs after the server exited"
    assert reader.ended_at - signalled_at < 3.0
    assert reader.clean_end  # the session was aborted, so the reader ended its body
    reader.close()
    assert exited_after < 3 + 2

    session = ShmStore(namespace).get("long")
    assert session is not None  # segments outlive the server
    assert session.info().state is State.ABORTED
    session.close()
