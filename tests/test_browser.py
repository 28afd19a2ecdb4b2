"""The chat page (``/shmstream/``) in headless Chromium against the real service: gunicorn
with 3 workers in front of the scripted SSE upstream (``sse_upstream.py``), which reports when
its client hung up. Playwright drives Debian's ``/usr/bin/chromium`` (Playwright's own
browser download is not used); ``scripts/test.sh`` installs it.

Without Chromium these tests fail, loudly; set ``SHMSTREAM_ALLOW_NO_BROWSER=1`` to skip them
instead on a machine that cannot have a browser.

The page sends ``{"messages": [...], "stream": true}``; each test adds the upstream's
``script`` to that body on its way out (Playwright request interception), so the answer is
known: " tok0 tok1 ..." with one word per event.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time

import httpx
import pytest
from polling import wait_for as _wait_for
from service import Service
from sse_upstream import UpstreamProcess

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
API_KEY = "browser-test-key"
ANSWER = ".turn:last-of-type .answer"
WAIT_MS = 20_000  # the longest any page condition may take


def full_text(events: int) -> str:
    return "".join(f" tok{index}" for index in range(events))


# --- fixtures ----------------------------------------------------------------------------


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (scripts/test.sh installs Debian's chromium as root)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("SHMSTREAM_ALLOW_NO_BROWSER") == "1":
            pytest.skip(f"no browser, and SHMSTREAM_ALLOW_NO_BROWSER=1: {missing}")
        pytest.fail(f"the browser tests need Chromium: {missing}. Set "
                    f"SHMSTREAM_ALLOW_NO_BROWSER=1 to skip them on this machine.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                              timeout=60_000)
        yield chromium
        chromium.close()


@pytest.fixture
def start_service(namespace, tmp_path, upstream):
    """``start_service(**settings)``: gunicorn with 3 workers and the API key set."""
    started = []

    def start(**settings) -> Service:
        settings.setdefault("api_key", API_KEY)
        service = Service(namespace, upstream.url, str(tmp_path), workers=3, **settings)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()


class Browsing:
    """A browser context on a service (its pages share localStorage, like tabs), which adds
    ``script`` to every completion request and keeps the pages' console for failures."""

    def __init__(self, browser, base_url: str, script: dict, api_key: str | None = API_KEY):
        origin = base_url.rstrip("/")
        storage = [{"name": "shmstream.apiKey", "value": api_key}] if api_key else []
        self.context = browser.new_context(storage_state={
            "cookies": [], "origins": [{"origin": origin, "localStorage": storage}]})
        self.context.set_default_timeout(WAIT_MS)
        self.script = script
        self.url = origin + "/shmstream/"
        self.console: list[str] = []
        self.context.route("**/v1/chat/completions", self._add_script)

    def _add_script(self, route, request) -> None:
        body = json.loads(request.post_data or "{}")
        body["script"] = self.script
        route.continue_(post_data=json.dumps(body))

    def open(self):
        page = self.context.new_page()
        tab = len(self.context.pages)
        page.on("console", lambda message: self.console.append(f"tab {tab}: {message.text}"))
        page.on("pageerror", lambda error: self.console.append(f"tab {tab} error: {error}"))
        page.goto(self.url)
        page.wait_for_selector("#composer")
        return page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def browsing(browser):
    """``browsing(service, script, base_url=..., api_key=...)``; the pages' console is
    printed at teardown (pytest shows it when the test failed)."""
    made: list[Browsing] = []

    def make(service: Service, script: dict, base_url: str | None = None,
             **options) -> Browsing:
        session = Browsing(browser, base_url or service.url, script, **options)
        made.append(session)
        return session

    yield make
    for session in made:
        print("\n".join(session.console[-80:]))
        session.close()


# --- helpers -------------------------------------------------------------------------------


def send(page, text: str = "hello") -> None:
    page.fill("#message", text)
    page.click("#send")


def answer_of(page) -> str:
    return page.locator(ANSWER).text_content() or ""


def state_of(page) -> str:
    return page.locator("#state").text_content() or ""


def wait_answer(page, text: str, timeout: int = WAIT_MS) -> None:
    """Until the last answer is exactly ``text`` (whitespace included)."""
    page.wait_for_function(
        "([selector, text]) => document.querySelector(selector)?.textContent === text",
        arg=[ANSWER, text], timeout=timeout)


def wait_answer_contains(page, text: str, timeout: int = WAIT_MS) -> None:
    page.wait_for_function(
        "([selector, text]) => (document.querySelector(selector)?.textContent ?? '')"
        ".includes(text)", arg=[ANSWER, text], timeout=timeout)


def wait_state(page, state: str, timeout: int = WAIT_MS) -> None:
    page.wait_for_function("state => document.getElementById('state').textContent === state",
                           arg=state, timeout=timeout)


def upstream_record(upstream: UpstreamProcess, tag: str) -> dict | None:
    answer = httpx.get(f"{upstream.url}/_test/log", params={"tag": tag}, timeout=5)
    return answer.json() if answer.status_code == 200 else None


def wait_for(predicate, timeout: float = 10.0, step: float = 0.02):
    return _wait_for(predicate, timeout, step)


def requests_of(service: Service, method: str, prefix: str) -> list[tuple[int, str, int]]:
    """(worker pid, path?query, status) of the service's requests of that kind."""
    return [(pid, target, status) for pid, verb, target, status in service.access()
            if verb == method and target.startswith(prefix)]


def chat_id(page) -> str:
    return page.evaluate("localStorage.getItem('shmstream.current')")


def lookup(service: Service, conversation_id: str) -> list[dict]:
    return httpx.post(f"{service.url}/v1/streams/lookup", timeout=5,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"conversation_ids": [conversation_id]}).json()


def new_tag(name: str) -> str:
    return f"{name}-{os.getpid()}-{time.monotonic_ns()}"


# --- the tests -----------------------------------------------------------------------------


def test_reload_mid_answer_resumes_from_the_saved_offset(start_service, browsing, upstream):
    service = start_service()
    events, tag = 40, new_tag("reload")
    session = browsing(service, {"tag": tag, "events": events, "interval": 0.08})
    page = session.open()
    send(page)
    wait_answer_contains(page, " tok5 ")
    assert state_of(page) == "running"
    page.reload()
    wait_answer(page, full_text(events))
    wait_state(page, "done")

    assert len(requests_of(service, "POST", "/v1/chat/completions")) == 1
    resumed = [target for _, target, status in requests_of(service, "GET", "/v1/stream/")
               if status == 200]
    assert resumed and "from=0" not in resumed[0], f"rebuilt instead of resumed: {resumed}"
    record = upstream_record(upstream, tag)
    assert record["finished"] and record["closed_at"] is None
    # What the page kept is what it shows, for the next reload.
    saved = page.evaluate("JSON.parse(localStorage.getItem('shmstream.chat.' + "
                          "localStorage.getItem('shmstream.current')))")
    answer = saved["turns"][-1]["answer"]
    assert answer["text"] == full_text(events) and answer["state"] == "done"
    assert answer["offset"] == len(base64.b64decode(record["sent"]))


def test_stop_cancels_the_generation_and_closes_the_upstream(start_service, browsing,
                                                              upstream):
    service = start_service()
    tag = new_tag("stop")
    session = browsing(service, {"tag": tag, "events": 400, "interval": 0.05})
    page = session.open()
    send(page)
    wait_answer_contains(page, " tok3 ")
    page.click("#stop")
    wait_state(page, "cancelled", timeout=5_000)
    closed_at = wait_for(lambda: upstream_record(upstream, tag)["closed_at"], timeout=5)
    assert closed_at is not None
    assert requests_of(service, "DELETE", "/v1/stream/")
    shown = answer_of(page)
    assert shown.startswith(full_text(4)) and shown != full_text(400)
    time.sleep(1.0)  # nothing more arrives, and the page does not re-attach
    assert answer_of(page) == shown and state_of(page) == "cancelled"
    assert page.locator("#stop").is_hidden()
    assert lookup(service, chat_id(page)) == []
    assert not upstream_record(upstream, tag)["finished"]


def test_a_second_tab_follows_the_same_answer_live(start_service, browsing, upstream):
    service = start_service()
    events, tag = 40, new_tag("tabs")
    session = browsing(service, {"tag": tag, "events": events, "interval": 0.08})
    first, second = session.open(), session.open()
    send(first)
    wait_answer_contains(second, " tok3 ")
    assert state_of(second) == "running", "the second tab only caught up after the end"
    wait_answer(first, full_text(events))
    wait_answer(second, full_text(events))
    wait_state(first, "done")
    wait_state(second, "done")
    assert second.locator(".turn .user").last.text_content() == "hello"
    assert len(requests_of(service, "POST", "/v1/chat/completions")) == 1
    assert requests_of(service, "GET", "/v1/stream/"), "the second tab read the session"


class CuttableProxy:
    """A TCP forwarder in front of the service whose ``cut()`` drops every open connection
    mid-body, as a flaky network or a restarted load balancer would."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cuts = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                server.settimeout(None)
            except OSError:
                return
            with self._lock:
                self._sockets |= {client, server}
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        with self._lock:
            doomed, self._sockets = self._sockets, set()
            self.cuts += 1
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
            sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        self.listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(5)


def test_a_dropped_connection_resumes_from_the_bytes_it_has(start_service, browsing, upstream):
    service = start_service()
    proxy = CuttableProxy(service.port)
    try:
        events, tag = 40, new_tag("drop")
        session = browsing(service, {"tag": tag, "events": events, "interval": 0.08},
                           base_url=proxy.url)
        page = session.open()
        send(page)
        wait_answer_contains(page, " tok4 ")
        proxy.cut()
        wait_answer_contains(page, " tok14 ")
        proxy.cut()
        wait_answer(page, full_text(events))
        wait_state(page, "done")
    finally:
        proxy.close()
    assert len(requests_of(service, "POST", "/v1/chat/completions")) == 1
    resumed = [target for _, target, status in requests_of(service, "GET", "/v1/stream/")
               if status == 200]
    assert len(resumed) >= 2 and not any("from=0" in target for target in resumed), resumed


def test_offset_lost_is_shown(start_service, browsing, upstream):
    service = start_service(max_bytes=4096)
    tag = new_tag("lost")
    session = browsing(service, {"tag": tag, "events": 60, "interval": 0.02, "pad": 300})
    page = session.open()
    send(page)
    wait_answer_contains(page, " tok2")
    page.goto("about:blank")  # the tab leaves; the answer goes on without it
    wait_for(lambda: upstream_record(upstream, tag)["events_sent"] >= 30, timeout=10)
    page.goto(session.url)
    wait_state(page, "offset lost")
    assert "no longer holds" in page.locator("#status-detail").text_content()
    lost = [status for _, _, status in requests_of(service, "GET", "/v1/stream/")]
    assert 400 in lost


def test_an_upstream_error_is_shown_as_failed(start_service, browsing):
    service = start_service()
    error = {"error": {"code": 503, "message": "loading model", "type": "unavailable_error"}}
    session = browsing(service, {"tag": new_tag("error"), "status": 503, "error_body": error})
    page = session.open()
    send(page)
    wait_state(page, "failed")
    assert page.locator(".turn .answer-error").last.text_content() == "loading model"
    assert lookup(service, chat_id(page))[0]["state"] == "failed"


def test_the_page_asks_for_the_api_key_and_then_works(start_service, browsing):
    service = start_service()
    session = browsing(service, {"tag": new_tag("key"), "events": 5, "interval": 0.01},
                       api_key=None)
    page = session.open()  # the page itself needs no key
    send(page)
    wait_state(page, "API key needed")
    assert page.locator("#key-box").get_attribute("open") is not None
    assert page.input_value("#message") == "hello", "the message was not lost"
    page.fill("#api-key", API_KEY)
    page.click("#send")
    wait_answer(page, full_text(5))
    wait_state(page, "done")
    assert page.evaluate("localStorage.getItem('shmstream.apiKey')") == API_KEY


def test_new_chat_starts_over_with_a_new_conversation_id(start_service, browsing):
    service = start_service()
    session = browsing(service, {"tag": new_tag("new"), "events": 3, "interval": 0.01})
    page = session.open()
    send(page)
    wait_state(page, "done")
    old = chat_id(page)
    page.click("#new-chat")
    assert chat_id(page) != old
    assert page.locator(".turn").count() == 0
    page.reload()
    assert page.locator(".turn").count() == 0 and chat_id(page) != old
