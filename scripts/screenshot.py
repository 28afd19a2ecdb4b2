#!/usr/bin/env python3
"""Take docs/screenshot.png: the chat page at /shmstream/ resuming an answer after a reload.

Starts the real service (gunicorn, 3 workers, the built-in demo model at a slow token rate)
in its own shared-memory namespace, asks two questions in headless Chromium, reloads the
page in the middle of the second answer and takes the picture while the page resumes from
the byte offset it had saved. Everything it starts is stopped and removed at exit.

    .venv/bin/python scripts/screenshot.py [--output docs/screenshot.png]

Needs Debian's chromium at /usr/bin/chromium and playwright (the test extra).
"""

from __future__ import annotations

import argparse
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


def take(output: str, tokens_per_second: float) -> None:
    namespace = f"shot{os.getpid()}x{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as logs, \
            Service(namespace, None, logs, workers=3,
                    demo_tokens_per_second=tokens_per_second) as service, \
            sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 860, "height": 620},
                                    device_scale_factor=2, color_scheme="light")
            page.set_default_timeout(30_000)
            page.goto(service.url + "/shmstream/")
            for question in QUESTIONS:
                page.wait_for_selector("#send:not([disabled])")
                page.fill("#message", question)
                page.click("#send")
                page.wait_for_function(
                    "n => document.querySelectorAll('.turn').length === n",
                    arg=QUESTIONS.index(question) + 1)
            page.wait_for_function(
                "s => (document.querySelector(s)?.textContent ?? '').split(' ').length > 24",
                arg=ANSWER)
            page.reload()
            page.wait_for_function(
                "() => document.getElementById('status-detail').textContent"
                ".includes('resumed from byte')")
            time.sleep(0.8)  # a few words arrive after the resume point
            page.screenshot(path=output)
            browser.close()
        finally:
            service.stop()
            ShmStore(namespace).purge()
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "screenshot.png"))
    parser.add_argument("--tokens-per-second", type=float, default=12.0)
    args = parser.parse_args()
    take(args.output, args.tokens_per_second)


if __name__ == "__main__":
    main()
