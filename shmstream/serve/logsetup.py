"""shmstream's log lines in the processes gunicorn does not configure for us (HTTP
workers, relays): one stderr handler on the ``shmstream`` logger, at SHMSTREAM_LOG_LEVEL."""

from __future__ import annotations

import logging
import os
import sys

LINE_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_process_logging() -> None:
    """Send shmstream's loggers to stderr unless this process already routes them (a root
    handler or one of ours, e.g. set up by an embedding application)."""
    package = logging.getLogger("shmstream")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    package.addHandler(handler)
    package.setLevel(os.environ.get("SHMSTREAM_LOG_LEVEL", "INFO").upper())
