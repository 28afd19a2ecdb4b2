"""shmstream's gunicorn configuration, used by ``gunicorn -c gunicorn.conf.py`` (the file in
the repository root imports this) and by ``shmstream serve`` (``-c python:...``).

Everything comes from the environment: the ``SHMSTREAM_*`` settings of
:class:`shmstream.config.Settings`, plus ``SHMSTREAM_BIND``, ``SHMSTREAM_WORKERS``,
``SHMSTREAM_THREADS`` for the process model (``SHMSTREAM_RELAYS`` and
``SHMSTREAM_GRACEFUL_TIMEOUT`` are settings: the relays read them too).
"""

import math
import os

from shmstream.config import Settings
from shmstream.serve import gunicorn_hooks

RELAY_MARGIN = 5.0  # seconds

_cpus = os.cpu_count() or 1

wsgi_app = "shmstream.serve.wsgi:application"
bind = [os.environ.get("SHMSTREAM_BIND", "127.0.0.1:8080")]
# gthread: a blocking semaphore/futex wait would stall gevent's hub, and the sync worker
# kills long streams at its timeout. Every open stream holds one thread.
worker_class = "gthread"
workers = int(os.environ.get("SHMSTREAM_WORKERS") or max(2, min(2 * _cpus, 8)))
threads = int(os.environ.get("SHMSTREAM_THREADS") or 128)
worker_connections = max(1000, threads * 2)
# Streams last minutes; the worker heartbeat comes from gthread's main loop, not requests.
timeout = 60
# SHMSTREAM_GRACEFUL_TIMEOUT is the relays' deadline for running answers on SIGTERM; the
# HTTP workers get a few seconds more, so their readers still deliver the end (done, or
# aborted at the deadline) before gunicorn kills them.
graceful_timeout = math.ceil(Settings.from_env().graceful_timeout + RELAY_MARGIN)
keepalive = 5
# Build the app in each worker after fork: shared memory handles, threads and HTTP pools
# must not be inherited from the master.
preload_app = False
proc_name = "shmstream"
# gunicorn 23+'s control socket defaults to one path per user: two services (or parallel
# test runs) would fight over it. shmstream's own tools read shared memory instead.
control_socket_disable = True
accesslog = os.environ.get("SHMSTREAM_ACCESS_LOG") or None
# Ids are capabilities: the access log shows a hash where a request line has one.
logger_class = "shmstream.serve.accesslog.RedactingLogger"

when_ready = gunicorn_hooks.when_ready
child_exit = gunicorn_hooks.child_exit
on_exit = gunicorn_hooks.on_exit
on_reload = gunicorn_hooks.on_reload
