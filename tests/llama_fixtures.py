"""Fixtures shared by the tests in front of the real llama-server
(tests/test_llama_server.py, tests/test_llama_webui.py). It is a pytest plugin: those
modules say ``pytest_plugins = ["llama_fixtures"]``, so the session-scoped fixtures are
started once for both.

``llama`` is one llama-server for the test session with the tiny random model;
``llama_service`` is the real service (gunicorn, 4 workers) in front of it. A test that uses
``slots_idle_after`` (the modules put it in ``pytestmark``) fails when it leaves a slot
generating, and the next test starts clean.
"""

from __future__ import annotations

import time

import pytest
from conftest import _fresh_namespace
from llama_client import SETTLE_TIMEOUT, WORKERS
from llama_model import VOCAB_FILE, write_model
from llama_server import LlamaServer, require_llama, vocab
from service import Service


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    require_llama()
    directory = tmp_path_factory.mktemp("llama")
    model = write_model(vocab(VOCAB_FILE), directory / "tiny-random.gguf")
    with LlamaServer(model, directory) as server:
        yield server


@pytest.fixture(scope="session")
def llama_namespace():
    yield from _fresh_namespace("l")


@pytest.fixture(scope="session")
def llama_service(llama, llama_namespace, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-service")
    with Service(llama_namespace, llama.url, str(directory), workers=WORKERS) as service:
        yield service


@pytest.fixture
def slots_idle_after(llama):
    """Every test leaves llama-server idle (its streams stopped), or fails."""
    yield
    server = llama
    if server.process is None or server.process.poll() is not None:
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while server.busy():
        if time.monotonic() > deadline:
            pytest.fail(f"llama-server still generating after the test: {server.busy()}")
        time.sleep(0.05)
