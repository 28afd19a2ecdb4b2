"""shmstream's gunicorn configuration, used by ``gunicorn -c gunicorn.conf.py`` (the file in
the repository root imports this) and by ``shmstream serve`` (``-c python:...``).

Everything comes from the environment: the ``SHMSTREAM_*`` settings of
:class:`shmstream.config.Settings` (``SHMSTREAM_BIND``, ``SHMSTREAM_WORKERS`` and
``SHMSTREAM_ACCESS_LOG`` for the process model; ``SHMSTREAM_RELAYS`` and
``SHMSTREAM_GRACEFUL_TIMEOUT`` are read by the relays too). A bad value stops gunicorn with
the one-line error of :mod:`shmstream.config`.
"""

import math
import os
import sys

from shmstream.config import SettingError, Settings
from shmstream.serve import gunicorn_hooks

try:
    _settings = Settings.from_env()
except SettingError as _error:
    sys.exit(f"shmstream: {_error}")

RELAY_MARGIN = 5.0  # seconds

_cpus = os.cpu_count() or 1

wsgi_app = "shmstream.serve.asgi:application"
bind = [_settings.bind]
# gunicorn's own event-driven ASGI worker (gunicorn >= 24) on uvloop, with the
# gunicorn_h1c parser: a reader is a coroutine and a socket, not a thread; blocking futex
# waits live in one waiter thread per session (shmstream/shm/waiter.py).
# Measured against uvicorn-worker (uvloop + httptools) on this 2-core machine, 2 workers,
# Falcon ASGI: 57 vs 53 us of worker CPU per short request, 19 vs 18 us per streamed SSE
# chunk (1000 streams x 100 chunks; medians of 3-4 runs, within the machine's noise).
# Without gunicorn_h1c gunicorn's Python parser cost 85 us per request. At par, gunicorn's
# worker keeps gunicorn's access logger (ids redacted by RedactingLogger below), its
# request limits and its graceful-timeout and signal handling with no glue code, which
# uvicorn-worker would need (its access log would print ids).
worker_class = "asgi"
asgi_loop = "auto"  # uvloop when installed
http_parser = "auto"  # gunicorn_h1c when installed
asgi_lifespan = "auto"  # the app builds itself at the lifespan startup (or first request)
workers = _settings.workers or max(2, min(2 * _cpus, 8))
# Accepted for compatibility with the thread-per-stream configuration; unused by asgi.
threads = 1
worker_connections = 100_000
# Streams last minutes; the worker heartbeat comes from its event loop, not requests.
timeout = 60
# SHMSTREAM_GRACEFUL_TIMEOUT is the relays' deadline for running answers on SIGTERM; the
# HTTP workers get a few seconds more, so their readers still deliver the end (done, or
# aborted at the deadline) before gunicorn kills them.
graceful_timeout = math.ceil(_settings.graceful_timeout + RELAY_MARGIN)
keepalive = 5
# Build the app in each worker after fork: shared memory handles, threads and HTTP pools
# must not be inherited from the master.
preload_app = False
proc_name = "shmstream"
# gunicorn 23+'s control socket defaults to one path per user: two services (or parallel
# test runs) would fight over it. shmstream's own tools read shared memory instead.
control_socket_disable = True
accesslog = _settings.access_log
# Ids are capabilities: the access log shows a hash where a request line has one.
logger_class = "shmstream.serve.accesslog.RedactingLogger"

on_starting = gunicorn_hooks.on_starting
when_ready = gunicorn_hooks.when_ready
child_exit = gunicorn_hooks.child_exit
on_exit = gunicorn_hooks.on_exit
on_reload = gunicorn_hooks.on_reload
