"""What shmstream/serve/_gunicorn_internals.py assumes of the installed gunicorn; a failure
here names the assumption an upgrade broke."""

from __future__ import annotations

import inspect

from gunicorn.arbiter import Arbiter

from shmstream.serve import _gunicorn_internals


def test_the_arbiter_dispatches_stop_signals_to_handle_methods():
    for name in _gunicorn_internals.STOP_SIGNALS:
        assert callable(getattr(Arbiter, name, None)), f"Arbiter.{name} is gone"
    for signame in ("term", "int", "quit"):
        assert signame in Arbiter.SIG_NAMES.values(), f"Arbiter.SIG_NAMES lacks {signame}"
    # the main loop looks the handler up on the instance by name, so a wrapper set on the
    # running arbiter is the one called
    source = inspect.getsource(Arbiter.run)
    assert 'getattr(self, "handle_%s"' in source or "getattr(self, 'handle_%s'" in source, \
        "Arbiter.run no longer dispatches signals through getattr(self, 'handle_<name>')"


def test_the_callback_runs_before_the_original_handler():
    calls = []

    class Server:
        def handle_term(self):
            calls.append("term")

        def handle_int(self):
            calls.append("int")

        def handle_quit(self):
            calls.append("quit")

    server = Server()
    _gunicorn_internals.before_stop_signals(server, lambda graceful: calls.append(graceful))
    server.handle_term()
    server.handle_int()
    server.handle_quit()
    assert calls == [True, "term", False, "int", False, "quit"]
