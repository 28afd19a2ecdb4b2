"""Debian's Chromium driven by Playwright, for every browser test (the chat page, the
llama.cpp web UI). Playwright's own browser download is never used."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium's connections are refused by this
# machine's closed network, many at a time.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def browser_missing() -> str | None:
    """Why no browser can run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (scripts/test.sh installs Debian's chromium as root)"
    return None


def launched_browser(what: str) -> Iterator:
    """A fixture body: Chromium for ``what`` (e.g. "the browser tests"). Fails loudly when
    it is missing, unless SHMSTREAM_ALLOW_NO_BROWSER=1 skips instead."""
    missing = browser_missing()
    if missing:
        if os.environ.get("SHMSTREAM_ALLOW_NO_BROWSER") == "1":
            pytest.skip(f"no browser, and SHMSTREAM_ALLOW_NO_BROWSER=1: {missing}")
        pytest.fail(f"{what} need Chromium: {missing}. Set "
                    f"SHMSTREAM_ALLOW_NO_BROWSER=1 to skip them on this machine.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                              timeout=60_000)
        yield chromium
        chromium.close()
