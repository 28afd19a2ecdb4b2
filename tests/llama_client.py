"""Clients for the tests in front of the real llama-server: a streaming POST that can be
dropped mid-answer, replay and lookup, SSE parsing, llama-server's slots, and connections
pinned to chosen gunicorn workers."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import uuid
from urllib.parse import quote

import httpx
from llama_server import LlamaServer
from polling import wait_for
from service import Service

from shmstream.store.ids import short_hash

SLOT_IDLE_BOUND = 1.0  # seconds from Stop (or a replace, or a kill) to an idle slot: issue 9
WORKERS = 4  # gunicorn workers in front of llama-server, as in issue 9
SETTLE_TIMEOUT = 30.0  # generous bound for anything the loaded machine may make slow


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def stream_url(base: str, conversation_id: str, offset: int | None = None) -> str:
    url = f"{base}/v1/stream?conv_id={quote(conversation_id, safe='')}"
    return url if offset is None else f"{url}&from={offset}"


def chat_body(max_tokens: int, prompt: str = "tell me a story", **extra) -> dict:
    """A chat completion that runs ``max_tokens`` tokens (the model never emits EOS, and
    ``ignore_eos`` makes sure of it), with per-token timings as the web UI asks for."""
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "timings_per_token": True}
    body.update(extra)
    return body


class StreamingCall:
    """A POST whose streamed response is read in a thread, so a test can watch its bytes
    arrive and drop the caller at any moment (a socket shutdown, as a closed tab does)."""

    def __init__(self, base_url: str, path: str, body: dict, conversation_id: str | None):
        host, port = base_url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)
        self.path = path
        self.body = json.dumps(body).encode()
        self.headers = {"Content-Type": "application/json"}
        if conversation_id is not None:
            self.headers["X-Conversation-Id"] = conversation_id
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.received = 0
        self.ended = threading.Event()  # the body ended, or the connection broke
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._dropped = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StreamingCall:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.connection.request("POST", self.path, body=self.body, headers=self.headers)
            response = self.connection.getresponse()
            self.status = response.status
            self.response_headers = {k.lower(): v for k, v in response.getheaders()}
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    break
                self.chunks.append(chunk)
                self.received += len(chunk)
        except BaseException as exc:  # reported to the test, not swallowed
            if not self._dropped:
                self.error = exc
        finally:
            self.ended.set()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def wait_bytes(self, count: int, timeout: float = SETTLE_TIMEOUT) -> int:
        """Wait until ``count`` body bytes arrived; the number received. AssertionError if
        the call ended or failed first."""
        deadline = time.monotonic() + timeout
        while self.received < count:
            if self.ended.is_set():
                raise AssertionError(f"the call ended after {self.received} bytes "
                                     f"(status {self.status}, error {self.error!r})")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.received} of {count} bytes in {timeout}s")
            time.sleep(0.01)
        return self.received

    def drop(self) -> int:
        """Hang up at once; the number of bytes received (all that will be)."""
        self._dropped = True
        sock = self.connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)
        self._thread.join(10)
        with contextlib.suppress(OSError):
            self.connection.close()
        return self.received

    def join(self, timeout: float = SETTLE_TIMEOUT) -> bytes:
        assert self.ended.wait(timeout), f"the call did not end in {timeout}s"
        assert self.error is None, f"the call failed: {self.error!r}"
        return self.data


def lookup(base_url: str, conversation_id: str) -> list[dict]:
    response = httpx.post(base_url + "/v1/streams/lookup", timeout=10,
                          json={"conversation_ids": [conversation_id]})
    response.raise_for_status()
    return response.json()


def wait_done(base_url: str, conversation_id: str, timeout: float = SETTLE_TIMEOUT) -> dict:
    """The session's lookup entry once it is done (any terminal state)."""
    def done():
        entries = [e for e in lookup(base_url, conversation_id)
                   if e["conversation_id"] == conversation_id]
        return entries[0] if entries and entries[0]["is_done"] else None
    return wait_for(done, timeout, interval=0.05)


def replay(base_url: str, conversation_id: str, offset: int = 0) -> bytes:
    """``GET /v1/stream?conv_id=..&from=offset`` read to its end."""
    response = httpx.get(stream_url(base_url, conversation_id, offset), timeout=60)
    assert response.status_code == 200, (response.status_code, response.text)
    return response.content


def sse_events(data: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event in ``data`` (comments and pings skipped)."""
    events = []
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, lines = None, []
        for line in block.decode("utf-8").split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                lines.append(line[5:].removeprefix(" "))
        if lines:
            events.append((name, "\n".join(lines)))
    return events


def chat_content(data: bytes) -> str:
    """The concatenated ``choices[0].delta.content`` of a chat completion stream."""
    text = []
    for _, payload in sse_events(data):
        if payload == "[DONE]":
            continue
        for choice in json.loads(payload).get("choices", []):
            text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def slot_of_task(server: LlamaServer, task: int) -> dict | None:
    for slot in server.slots():
        if slot.get("id_task") == task:
            return slot
    return None


def single_busy_slot(server: LlamaServer, timeout: float = SETTLE_TIMEOUT) -> dict:
    """The one slot generating (after the stream began). AssertionError otherwise."""
    def one():
        busy = [s for s in server.busy() if s.get("next_token")]
        return busy[0] if len(busy) == 1 else None
    return wait_for(one, timeout, interval=0.02)


def time_until_idle(server: LlamaServer, task: int, started: float,
                    timeout: float = SETTLE_TIMEOUT) -> float:
    """Seconds from ``started`` (time.monotonic()) until llama-server's slot no longer runs
    ``task``. AssertionError if it still does after ``timeout``."""
    deadline = started + timeout
    while True:
        slot = slot_of_task(server, task)
        now = time.monotonic()
        if slot is None or not slot.get("is_processing"):
            return now - started
        if now > deadline:
            raise AssertionError(f"task {task} still generating {timeout}s later: {slot}")
        time.sleep(0.01)


def remaining_seconds(slot: dict, started: float) -> float:
    """How long the slot's generation would still run by itself, at its rate so far: until
    its ``max_tokens`` or its context is used up, whichever comes first."""
    progress = slot["next_token"][0]
    decoded = progress["n_decoded"]
    remain = progress["n_remain"] if progress["n_remain"] >= 0 else float("inf")
    remain = min(remain, slot["n_ctx"] - slot.get("n_prompt_tokens", 0) - decoded)
    rate = decoded / max(time.monotonic() - started, 1e-3)
    return remain / rate if rate > 0 else float("inf")


def logged_target(conversation_id: str) -> str:
    """How the access log shows an id: ``~<short hash>`` (ids are capabilities)."""
    return "~" + short_hash(conversation_id)


def logged_pids(service: Service, method: str, conversation_id: str) -> list[int]:
    """The pids that served ``method`` requests on ``conversation_id``, from the access log."""
    needle = logged_target(conversation_id)
    return [pid for pid, logged_method, target, _ in service.access()
            if logged_method == method and needle in target]


def logged_pid(service: Service, conversation_id: str) -> int:
    """The pid that served the (first) GET on ``conversation_id``."""
    return wait_for(lambda: (logged_pids(service, "GET", conversation_id) or [None])[0], 10)


class WorkerConnections:
    """Keep-alive connections to the service, each pinned to the worker that accepted it
    (learned from the access log), so a request can be sent on a chosen worker."""

    def __init__(self, service: Service, count: int = 12):
        self.service = service
        self.clients: dict[int, httpx.Client] = {}
        self._spare: list[httpx.Client] = []
        for index in range(count):
            client = httpx.Client(base_url=service.url, timeout=30,
                                  limits=httpx.Limits(max_connections=1))
            probe = f"worker-probe-{uuid.uuid4().hex[:8]}-{index}"
            client.get("/v1/stream", params={"conv_id": probe})
            pid = self._pid_of(probe)
            if pid is None or pid in self.clients:
                self._spare.append(client)
            else:
                self.clients[pid] = client

    def _pid_of(self, probe: str) -> int | None:
        return logged_pid(self.service, probe)

    def other_than(self, pid: int) -> tuple[int, httpx.Client]:
        """A connection served by a worker other than ``pid``."""
        for worker, client in self.clients.items():
            if worker != pid:
                return worker, client
        raise AssertionError(f"every probe landed on worker {pid}: {list(self.clients)}")

    def close(self) -> None:
        for client in [*self.clients.values(), *self._spare]:
            client.close()
