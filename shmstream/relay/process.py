"""A relay process's main loop: one event loop, one :class:`RelayServer`, signals.

Signals follow gunicorn's meaning for a worker, with the relay's own reload:

- ``SIGHUP`` (the master reloads): retire. Stop accepting (the new relays accept on the
  same socket), finish every running answer however long it takes, exit.
- ``SIGTERM`` (graceful stop): stop accepting, let running answers finish within
  ``graceful_timeout``, abort what still runs (``aborted``), exit. A SIGTERM while
  retiring starts that deadline.
- ``SIGINT`` / ``SIGQUIT`` (quick stop): abort every running session at once, exit.

Handlers only record what was asked; the main coroutine does the work, as gunicorn's
arbiter does. The store, upstream and listening socket come from the caller (the wiring in
:mod:`shmstream.serve.relays` opens them), so this module never knows a backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable

import uvloop

from shmstream.relay.client import AsyncUpstream
from shmstream.relay.server import RelayServer
from shmstream.store.interface import SessionStore

log = logging.getLogger("shmstream.relay.process")


class RelayProcess:
    def __init__(self, store: SessionStore, upstream: AsyncUpstream, sock: socket.socket,
                 ping_interval: float, graceful_timeout: float,
                 on_ready: Callable[[], None] | None = None):
        self.store = store
        self.upstream = upstream
        self.sock = sock
        self.ping_interval = ping_interval
        self.graceful_timeout = graceful_timeout
        self.on_ready = on_ready  # called once the relay accepts hand-offs
        self._asked: asyncio.Queue[str] | None = None

    def run(self) -> int:
        """Serve until told to stop; returns the exit status (0)."""
        # uvloop, as in the HTTP workers: its transports cost a relay about a third of
        # asyncio's per chunk read (scripts/bench_upstream_client.py, 200 streams).
        return uvloop.run(self._main())

    def _ask(self, what: str) -> None:
        assert self._asked is not None
        self._asked.put_nowait(what)

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._asked = asyncio.Queue()
        for sig, what in ((signal.SIGHUP, "retire"), (signal.SIGTERM, "stop"),
                          (signal.SIGINT, "quit"), (signal.SIGQUIT, "quit")):
            loop.add_signal_handler(sig, self._ask, what)
        server = RelayServer(self.store, self.upstream, self.ping_interval)
        await server.start(self.sock)
        if self.on_ready is not None:
            self.on_ready()
        log.info("relay running (pid %d): %s, ping every %g s", os.getpid(),
                 self.upstream.description, self.ping_interval)
        what = await self._asked.get()
        drain: asyncio.Task | None = None
        while True:
            if what == "quit":
                if drain is not None:
                    drain.cancel()
                log.info("relay pid %d: quick stop", os.getpid())
                await server.abort_all()
                break
            if drain is None or what == "stop":
                timeout = None if what == "retire" else self.graceful_timeout
                log.info("relay pid %d: %s, %d answer(s) running", os.getpid(),
                         "retiring" if what == "retire" else "stopping gracefully",
                         len(server.producers))
                if drain is not None:
                    drain.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await drain
                drain = loop.create_task(server.drain(timeout))
            asked = loop.create_task(self._asked.get())
            done, _ = await asyncio.wait({drain, asked}, return_when=asyncio.FIRST_COMPLETED)
            if drain in done:
                asked.cancel()
                break
            what = asked.result()
        await server.close()
        with contextlib.suppress(Exception):
            self.store.close()
        log.info("relay pid %d: exiting", os.getpid())
        return 0
