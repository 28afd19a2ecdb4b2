"""The ASGI entry point for gunicorn: ``shmstream.serve.asgi:application``.

The app is built on the first call in each worker process (the lifespan startup, or the
first request), never at import: the gunicorn master (which may import this module, e.g.
with ``preload_app``) must not map shared memory, open upstream connections or start
threads before it forks.

Completions go to the relay processes the gunicorn master started
(``SHMSTREAM_RELAY_SOCKET``). Without them (a foreign gunicorn configuration) each worker
embeds a :class:`~shmstream.relay.local.LocalRelay`, so producers run in the worker and a
worker's death aborts its answers; the log says so.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("shmstream.serve.asgi")

_app = None
_pid = 0


def _configure_logging() -> None:
    # gunicorn configures only its own loggers; without this our INFO lines would vanish.
    root = logging.getLogger()
    if not root.handlers and not logging.getLogger("shmstream").handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
        shmstream_log = logging.getLogger("shmstream")
        shmstream_log.addHandler(handler)
        shmstream_log.setLevel(os.environ.get("SHMSTREAM_LOG_LEVEL", "INFO").upper())


def build():
    """This process's ASGI app, from ``SHMSTREAM_*`` variables."""
    from shmstream import metrics
    from shmstream.backends import open_store
    from shmstream.config import Settings
    from shmstream.http.app import create_app
    from shmstream.relay.client import make_async_upstream
    from shmstream.relay.handoff import SOCKET_ENV, RelayClient

    _configure_logging()
    metrics.get()  # reserve this worker's metric files now, not when /dev/shm may be full
    settings = Settings.from_env()
    store = open_store(settings)
    upstream = make_async_upstream(settings.upstream, settings.demo_tokens_per_second)
    if os.environ.get(SOCKET_ENV):
        relay = RelayClient.from_env()
    else:
        from shmstream.relay.local import LocalRelay

        log.warning("pid %d: %s is not set: relaying completions inside this worker",
                    os.getpid(), SOCKET_ENV)
        relay_upstream = make_async_upstream(settings.upstream,
                                             settings.demo_tokens_per_second)
        relay = LocalRelay(store, relay_upstream, settings.ping_interval).start().client()
    return create_app(store, settings, upstream, relay)


def get_app():
    global _app, _pid
    if _pid != os.getpid():  # one event loop per worker: no lock needed
        _app = build()
        _pid = os.getpid()
    return _app


async def application(scope, receive, send):
    await get_app()(scope, receive, send)
