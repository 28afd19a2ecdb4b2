#!/usr/bin/env python3
"""Take the README's pictures of the chat page at /shmstream/:

- docs/screenshot.png: a desktop window resuming an answer after a reload (the built-in demo
  model at a slow token rate, picked from the model list);
- docs/screenshot-phone.png: a 390 px phone showing a markdown answer (heading, list, code,
  table) and the list of chats.

Starts the real service (gunicorn, 3 workers) in its own shared-memory namespace and drives
headless Chromium. The markdown answer is canned (the demo model writes plain words): the
page's completion request is answered by the browser with it. Everything it starts is
stopped and removed at exit.

    .venv/bin/python scripts/screenshot.py [--output-dir docs]

Needs Debian's chromium at /usr/bin/chromium and playwright (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/service.py starts gunicorn

from playwright.sync_api import sync_playwright  # noqa: E402
from service import Service  # noqa: E402

from shmstream.shm.store import ShmStore  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
QUESTIONS = ["What does shmstream do?",
             "And if I reload the page while you are answering?"]
ANSWER = ".turn:last-of-type .answer"


MARKDOWN_ANSWER = """## Resuming a stream

Every answer is a **session** on the server. After a reload the page asks where it was:

1. `POST /v1/streams/lookup` finds the session;
2. `GET /v1/stream/<id>?from=<bytes>` continues from the last byte it had.

```python
for chunk in store.get(conversation_id).read(offset=saved):
    send(chunk)
```

| event | what the page does |
|---|---|
| reload | resumes from its saved offset |
| Stop | `DELETE /v1/stream/<id>` |
"""


def _sse(text: str) -> str:
    words = text.split(" ")
    events = [json.dumps({"choices": [{"delta": {"content": word + " "}}]}) for word in words]
    return "".join(f"data: {event}\n\n" for event in events) + "data: [DONE]\n\n"


def _ask(page, question: str, turns: int) -> None:
    page.wait_for_selector("#send:not([disabled])")
    page.fill("#message", question)
    page.click("#send")
    page.wait_for_function("n => document.querySelectorAll('.turn').length === n", arg=turns)


def desktop(browser, url: str, output: str) -> None:
    page = browser.new_page(viewport={"width": 860, "height": 620}, device_scale_factor=2,
                            color_scheme="light")
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#model-box:not([hidden])")
    for number, question in enumerate(QUESTIONS, start=1):
        _ask(page, question, number)
    page.wait_for_function(
        "s => (document.querySelector(s)?.textContent ?? '').split(' ').length > 24", arg=ANSWER)
    page.reload()
    page.wait_for_function(
        "() => document.getElementById('status-detail').textContent.includes('reconnected')")
    time.sleep(0.8)  # a few words arrive after the resume point
    page.screenshot(path=output)
    page.close()


def phone(browser, url: str, output: str) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                  color_scheme="light", is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    _ask(page, "What does shmstream do?", 1)  # an earlier chat, for the list
    page.wait_for_function("() => document.getElementById('status').dataset.state === 'done'")
    page.click("#new-chat")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=_sse(MARKDOWN_ANSWER)))
    _ask(page, "How does the page resume an answer?", 1)
    page.wait_for_function("() => document.getElementById('status').dataset.state === 'done'")
    page.click("#chats > summary")
    page.screenshot(path=output)
    context.close()


def take(output_dir: str, tokens_per_second: float) -> None:
    namespace = f"shot{os.getpid()}x{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as logs, \
            Service(namespace, None, logs, workers=3,
                    demo_tokens_per_second=tokens_per_second) as service, \
            sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            url = service.url + "/shmstream/"
            desktop(browser, url, os.path.join(output_dir, "screenshot.png"))
            phone(browser, url, os.path.join(output_dir, "screenshot-phone.png"))
            browser.close()
        finally:
            service.stop()
            ShmStore(namespace).purge()
    print(f"wrote {output_dir}/screenshot.png and screenshot-phone.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--tokens-per-second", type=float, default=12.0)
    args = parser.parse_args()
    take(args.output_dir, args.tokens_per_second)


if __name__ == "__main__":
    main()
