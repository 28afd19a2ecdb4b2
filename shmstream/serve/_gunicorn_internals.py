"""The one place shmstream relies on gunicorn's arbiter beyond its documented hooks.

gunicorn has server hooks for start, reload, child exit and exit, but none that runs when
the master *receives* SIGTERM, SIGINT or SIGQUIT, before it starts stopping its workers.
shmstream needs that moment: the supervisor must stop restarting children and the relays
must be told to finish (TERM) or abort (INT/QUIT) their answers while the HTTP workers
drain. The arbiter's main loop dispatches a queued signal to its ``handle_<name>`` method
(``Arbiter.SIG_NAMES`` and ``handle_term``/``handle_int``/``handle_quit`` in
gunicorn/arbiter.py), so the hook wraps those methods on the running arbiter.
``tests/test_gunicorn_internals.py`` checks every assumption on the installed gunicorn and
fails by name on an upgrade that breaks one.
"""

from __future__ import annotations

from collections.abc import Callable

STOP_SIGNALS = {"handle_term": True, "handle_int": False, "handle_quit": False}


def before_stop_signals(server, callback: Callable[[bool], None]) -> None:
    """Run ``callback(graceful)`` in the master's loop before gunicorn handles SIGTERM
    (graceful=True), SIGINT or SIGQUIT (graceful=False)."""
    for name, graceful in STOP_SIGNALS.items():
        original = getattr(server, name)

        def handler(original=original, graceful=graceful):
            callback(graceful)
            return original()

        setattr(server, name, handler)
