"""An in-process relay: the relay's event loop in a thread of this process (tests, embedding).

    relay = LocalRelay(store, upstream, ping_interval=1.0).start()
    client = relay.client()          # the same RelayClient an HTTP worker uses
    ...
    relay.stop()                     # running sessions end ``aborted``

It serves the real hand-off protocol on a private unix socket, so an app built on it runs
the same code paths as under gunicorn, without relay processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import threading

from shmstream.relay.client import AsyncUpstream
from shmstream.relay.handoff import RelayClient
from shmstream.relay.server import BACKLOG, RelayServer
from shmstream.store.interface import SessionStore


class LocalRelay:
    """A :class:`RelayServer` on an event loop in a daemon thread of this process."""

    def __init__(self, store: SessionStore, upstream: AsyncUpstream,
                 ping_interval: float = 1.0):
        self.store = store
        self.upstream = upstream
        self.ping_interval = ping_interval
        self.server: RelayServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._directory = tempfile.mkdtemp(prefix="shmstream-relay-")
        self.socket_path = os.path.join(self._directory, "relay.sock")
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    def start(self) -> LocalRelay:
        """Start the loop and listen; returns self once the relay accepts."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.socket_path)
        sock.listen(BACKLOG)
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True,
                                        name="shmstream-local-relay")
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None:
            raise RuntimeError("the local relay did not start") from self._failure
        return self

    def _run(self, sock: socket.socket) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.server = RelayServer(self.store, self.upstream, self.ping_interval)
            self.loop.run_until_complete(self.server.start(sock))
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def client(self, submit_timeout: float = 10.0) -> RelayClient:
        """A client for this relay: the one an HTTP worker uses."""
        return RelayClient(self.socket_path, submit_timeout)

    def call(self, coroutine, timeout: float = 30.0):
        """Run ``coroutine`` on the relay's loop; its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        """Abort running sessions (``aborted``), stop the loop and remove the socket."""
        if self.loop is not None and self.server is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                self.call(self.server.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> LocalRelay:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
