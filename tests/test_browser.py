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
from chromium import launched_browser
from polling import wait_for as _wait_for
from service import Service
from sse_upstream import UpstreamProcess

from shmstream.shm.store import ShmStore

pytestmark = pytest.mark.slow

API_KEY = "browser-test-key"
ANSWER = ".turn:last-of-type .answer"
WAIT_MS = 20_000  # the longest any page condition may take


def full_text(events: int) -> str:
    return "".join(f" tok{index}" for index in range(events))


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    yield from launched_browser("the browser tests")


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
    """The last answer's visible text (rendered as markdown: a paragraph's edges trimmed)."""
    return (page.locator(ANSWER).text_content() or "").strip()


def state_of(page) -> str:
    """The state the status line shows (its ``data-state``; the label is for people)."""
    return page.locator("#status").get_attribute("data-state") or ""


def wait_answer(page, text: str, timeout: int = WAIT_MS) -> None:
    """Until the last answer shows exactly ``text`` (trimmed, as a paragraph is)."""
    page.wait_for_function(
        "([selector, text]) => document.querySelector(selector)?.textContent.trim() === text",
        arg=[ANSWER, text.strip()], timeout=timeout)


def wait_answer_contains(page, text: str, timeout: int = WAIT_MS) -> None:
    page.wait_for_function(
        "([selector, text]) => (document.querySelector(selector)?.textContent ?? '')"
        ".includes(text)", arg=[ANSWER, text], timeout=timeout)


def wait_state(page, state: str, timeout: int = WAIT_MS) -> None:
    page.wait_for_function("state => document.getElementById('status').dataset.state === state",
                           arg=state, timeout=timeout)


def upstream_record(upstream: UpstreamProcess, tag: str) -> dict | None:
    answer = httpx.get(f"{upstream.url}/_test/log", params={"tag": tag}, timeout=5)
    return answer.json() if answer.status_code == 200 else None


def wait_for(predicate, timeout: float = 10.0, step: float = 0.02):
    return _wait_for(predicate, timeout, step)


def requests_of(service: Service, method: str, prefix: str,
                until=bool) -> list[tuple[int, str, int]]:
    """(worker pid, path?query, status) of the service's requests of that kind, once
    ``until(them)`` holds: gunicorn logs a request after its response has gone, so the
    page may show the outcome before its line is written (a busy machine showed it)."""
    def matching():
        return [(pid, target, status) for pid, verb, target, status in service.access()
                if verb == method and target.startswith(prefix)]
    wait_for(lambda: until(matching()), timeout=10)
    return matching()


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
    resumed = [target for _, target, status in requests_of(
        service, "GET", "/v1/stream/", until=lambda them: any(s == 200 for *_, s in them))
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
    assert shown.startswith(full_text(4).strip()) and shown != full_text(400).strip()
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
    resumed = [target for _, target, status in requests_of(
        service, "GET", "/v1/stream/", until=lambda them: [s for *_, s in them].count(200) >= 2)
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
    wait_state(page, "lost")
    assert "no longer holds" in page.locator("#status-detail").text_content()
    lost = [status for _, _, status in requests_of(
        service, "GET", "/v1/stream/", until=lambda them: any(s == 400 for *_, s in them))]
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
    wait_state(page, "key")
    assert page.locator("#key-box").get_attribute("open") is not None
    assert page.input_value("#message") == "hello", "the message was not lost"
    page.fill("#api-key", API_KEY)
    page.click("#send")
    wait_answer(page, full_text(5))
    wait_state(page, "done")
    assert page.evaluate("localStorage.getItem('shmstream.apiKey')") == API_KEY


def test_a_send_pressed_while_the_refused_one_is_in_flight_is_not_lost(start_service, browsing):
    """The race a slow server opens: the user types the key and presses Send again while
    the first press's lookup (refused: no key yet) is still on its way back."""
    service = start_service()
    session = browsing(service, {"tag": new_tag("keyrace"), "events": 5, "interval": 0.01},
                       api_key=None)
    page = session.open()
    wait_state(page, "key")
    held, released = [], []

    def hold_the_keyless(route, request) -> None:
        if released or "authorization" in request.headers:
            route.continue_()
        else:
            held.append(route)

    page.route("**/v1/streams/lookup", hold_the_keyless)
    send(page)  # its lookup, sent without a key, is held
    page.fill("#api-key", API_KEY)
    page.click("#send")  # pressed while the first press still waits for its lookup
    released.append(True)
    for route in held:  # the refusals arrive after the second press
        route.continue_()
    wait_answer(page, full_text(5))
    wait_state(page, "done")


def test_new_chat_keeps_the_old_one_in_the_list_and_switches_back(start_service, browsing):
    service = start_service()
    session = browsing(service, {"tag": new_tag("new"), "events": 3, "interval": 0.01})
    page = session.open()
    send(page, "first chat")
    wait_state(page, "done")
    old = chat_id(page)
    page.click("#new-chat")
    assert chat_id(page) != old
    assert page.locator(".turn").count() == 0
    send(page, "second chat")
    wait_state(page, "done")
    new = chat_id(page)
    page.reload()
    assert chat_id(page) == new and page.locator(".turn .user").last.text_content() == "second chat"
    page.click("#chats > summary")
    items = page.locator("#chat-list .chat-open")
    assert items.all_text_contents() == ["second chat", "first chat"]  # newest first
    items.nth(1).click()
    wait_answer(page, full_text(3))
    assert chat_id(page) == old
    assert page.locator(".turn .user").last.text_content() == "first chat"
    assert page.locator("#chat-list .chat-open[aria-current=true]").text_content() == "first chat"
    # Deleting a chat removes it from this browser only.
    page.click("#chats > summary")
    page.locator("#chat-list li", has_text="second chat").locator(".chat-delete").click()
    assert page.locator("#chat-list .chat-open").all_text_contents() == ["first chat"]


MALICIOUS_ANSWER = "\n".join([
    "## Heading", "", "Some **bold** and `inline code`.", "",
    "```python", "print('<b>not bold</b>')", "```", "",
    "| a | b |", "|---|---|", "| 1 | 2 |", "",
    '<img src="x" onerror="window.__pwned = 1">',
    "<script>window.__pwned = 2</script>",
    "[click me](javascript:window.__pwned=3)",
    '<a href="javascript:window.__pwned=4">and me</a>',
    '<iframe src="javascript:window.__pwned=5"></iframe>',
    '<div onclick="window.__pwned=6" style="position:fixed;inset:0">overlay</div>',
])


def _sse_answer(text: str, words_per_event: int = 3) -> str:
    pieces = text.split(" ")
    events = []
    for start in range(0, len(pieces), words_per_event):
        content = " ".join(pieces[start:start + words_per_event])
        if start + words_per_event < len(pieces):
            content += " "
        events.append("data: " + json.dumps({"choices": [{"delta": {"content": content}}]}))
    return "\n\n".join([*events, "data: [DONE]"]) + "\n\n"


def _check_rendered_safely(page) -> None:
    answer = page.locator(ANSWER)
    assert answer.locator("h2").text_content() == "Heading"
    assert answer.locator("strong").text_content() == "bold"
    assert answer.locator("table td").all_text_contents() == ["1", "2"]
    code = answer.locator("pre code")
    assert code.text_content().strip() == "print('<b>not bold</b>')"  # text, not markup
    family = code.evaluate("element => getComputedStyle(element).fontFamily")
    assert "mono" in family.lower(), family
    assert answer.locator("code").first.evaluate(
        "element => getComputedStyle(element).fontFamily") == family
    html = answer.inner_html()
    for forbidden in ("onerror", "<script", 'href="javascript:', 'src="javascript:', "<iframe",
                      "onclick", "style="):
        assert forbidden not in html.lower(), (forbidden, html)
    for link in answer.locator("a").all():
        link.click()  # whatever is left of the links runs nothing
    assert page.evaluate("window.__pwned") is None


def test_answers_render_as_markdown_without_html_injection(start_service, browsing):
    service = start_service()
    session = browsing(service, {"tag": new_tag("md"), "events": 1})
    page = session.open()
    # This page's completion answers with a hostile model's markdown (the page's own
    # rendering is under test; the service relays bytes unchanged).
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=_sse_answer(MALICIOUS_ANSWER)))
    send(page, "show me markdown")
    wait_state(page, "done")
    _check_rendered_safely(page)
    page.reload()  # rendered again from what the page saved
    page.wait_for_selector(ANSWER + " h2")
    _check_rendered_safely(page)


def test_the_model_comes_from_the_upstream_list_and_is_sent(start_service, browsing):
    service = start_service()
    session = browsing(service, {"tag": new_tag("model"), "events": 2, "interval": 0.01})
    sent: list[dict] = []
    session.context.on("request", lambda request: sent.append(json.loads(request.post_data))
                       if request.url.endswith("/v1/chat/completions") else None)
    session.context.route("**/v1/models", lambda route: route.fulfill(
        status=200, content_type="application/json",
        body=json.dumps({"object": "list", "data": [{"id": "alpha"}, {"id": "beta"}]})))
    page = session.open()
    page.wait_for_selector("#model-box:not([hidden])")
    assert page.locator("#model option").all_text_contents() == ["alpha", "beta"]
    page.select_option("#model", "beta")
    send(page)
    wait_state(page, "done")
    assert sent and sent[-1]["model"] == "beta"
    page.reload()  # the choice is kept
    page.wait_for_selector("#model-box:not([hidden])")
    assert page.input_value("#model") == "beta"


def test_the_real_upstream_model_list_is_offered(start_service, browser, tmp_path, namespace):
    # The built-in demo model lists itself at /v1/models, as a real server does.
    service = Service(namespace + "d", None, str(tmp_path), workers=1).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(service.url + "/shmstream/")
        page.wait_for_selector("#model-box:not([hidden])")
        assert page.locator("#model option").all_text_contents() == ["shmstream-demo"]
        context.close()
    finally:
        service.stop()
        ShmStore(namespace + "d").purge()


def test_the_page_fits_a_390_px_phone(start_service, browsing):
    service = start_service()
    session = browsing(service, {"tag": new_tag("phone"), "events": 30, "interval": 0.01})
    page = session.open()
    page.set_viewport_size({"width": 390, "height": 800})
    send(page, "a long message " * 20)
    wait_state(page, "done")
    page.click("#new-chat")
    send(page, "second")
    wait_state(page, "done")
    page.click("#chats > summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for selector in ("#new-chat", "#chats > summary", "#send", "#message", "#chat-list"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (selector, box)


def test_the_status_line_speaks_to_people_not_internals(start_service, browsing):
    service = start_service()
    events, tag = 30, new_tag("status")
    session = browsing(service, {"tag": tag, "events": events, "interval": 0.08})
    session.context.add_init_script("""
        window.__statusTexts = [];
        new MutationObserver(() => {
          const status = document.getElementById('status');
          if (status) window.__statusTexts.push(status.textContent);
        }).observe(document, {subtree: true, childList: true, characterData: true});
    """)
    page = session.open()
    send(page)
    wait_answer_contains(page, " tok4 ")
    page.reload()  # a resume: the case that used to say "resumed from byte 4,891"
    wait_answer(page, full_text(events))
    wait_state(page, "done")
    texts = page.evaluate("window.__statusTexts")
    assert texts and any("reconnected" in text or "answering" in text for text in texts), texts
    for text in texts:
        assert "byte" not in text and "offset" not in text, text


def test_an_answer_keeps_running_while_another_chat_is_open(start_service, browsing, upstream):
    service = start_service()
    events, tag = 40, new_tag("switch")
    session = browsing(service, {"tag": tag, "events": events, "interval": 0.08})
    page = session.open()
    send(page, "long answer")
    wait_answer_contains(page, " tok3 ")
    first = chat_id(page)
    page.click("#new-chat")  # the answer goes on on the server, unread by this tab
    assert page.locator(".turn").count() == 0
    wait_for(lambda: upstream_record(upstream, tag)["events_sent"] >= 20, timeout=15)
    page.click("#chats > summary")
    page.locator("#chat-list .chat-open", has_text="long answer").click()
    assert chat_id(page) == first
    wait_answer(page, full_text(events))
    wait_state(page, "done")
    assert len(requests_of(service, "POST", "/v1/chat/completions")) == 1  # not asked again
    record = upstream_record(upstream, tag)
    assert record["finished"] and record["closed_at"] is None  # never cancelled
