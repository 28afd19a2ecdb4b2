"""The WSGI entry point for gunicorn: ``shmstream.serve.wsgi:application``.

The app is built on the first request in each worker process, never at import: the gunicorn
master (which may import this module, e.g. with ``preload_app``) must not map shared memory,
open upstream connections or start threads before it forks.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

_lock = threading.Lock()
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
    """This process's app, from ``SHMSTREAM_*`` variables."""
    from shmstream import metrics
    from shmstream.backends import open_store
    from shmstream.config import Settings
    from shmstream.http.app import create_app, make_upstream

    _configure_logging()
    metrics.get()  # reserve this worker's metric files now, not when /dev/shm may be full
    settings = Settings.from_env()
    store = open_store(settings)
    return create_app(store, settings, make_upstream(settings))


def get_app():
    global _app, _pid
    if _pid != os.getpid():
        with _lock:
            if _pid != os.getpid():
                _app = build()
                _pid = os.getpid()
    return _app


def application(environ, start_response):
    return get_app()(environ, start_response)
