"""The ASGI entry point for gunicorn: ``shmstream.serve.asgi:application``.

The app is built on the first call in each worker process (the lifespan startup, or the
first request), never at import: the gunicorn master (which may import this module, e.g.
with ``preload_app``) must not map shared memory, open upstream connections or start
threads before it forks.

The worker is gunicorn's own ``asgi`` worker (uvloop, gunicorn_h1c), chosen over
uvicorn-worker by measurement (gunicorn_config.py): at par on CPU per request and per
streamed chunk (57 vs 53 us, 19 vs 18 us, within this machine's noise), it keeps gunicorn's
access logger with ids redacted, its request limits and its signal handling without glue.

Completions go to the relay processes the gunicorn master started
(``SHMSTREAM_RELAY_SOCKET``). Without them (a foreign gunicorn configuration) each worker
embeds a :class:`~shmstream.relay.local.LocalRelay`, so producers run in the worker and a
worker's death aborts its answers; the log says so.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("shmstream.serve.asgi")

_app = None
_pid = 0


def build():
    """This process's ASGI app, from ``SHMSTREAM_*`` variables."""
    from shmstream import metrics
    from shmstream.backends import open_store
    from shmstream.config import Settings
    from shmstream.http.app import create_app
    from shmstream.relay.client import make_async_upstream
    from shmstream.relay.handoff import SOCKET_ENV, RelayClient
    from shmstream.serve.logsetup import configure_process_logging

    configure_process_logging()
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
        from shmstream.relay.h1client import make_relay_upstream

        relay_upstream = make_relay_upstream(settings.upstream,
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
