"""The relay's event loop: accept hand-offs, run their producers, tick, drain.

One :class:`RelayServer` per relay process (or per :class:`~shmstream.relay.local.LocalRelay`)
serves the frames of :mod:`shmstream.relay.wire` on a listening unix socket:

1. ``submit`` -> ``create_or_replace`` the session (its producer identity is this process),
   start a :class:`~shmstream.relay.producer.Producer` task, answer ``created`` with the
   token written into the session's metadata (or ``refused`` with the store's error);
2. when the upstream's status line arrives, send ``answer``; for a stream the connection
   then is the reader's doorbell until the session ends (relay/handoff.py), any other
   answer closes it.

Each connection is a protocol object (:class:`_Handoff`), no task. The connection is the
caller's only: when it closes (caller gone, HTTP worker killed) the producer goes on. One
ticker task per server makes cancellations land (a header peek per active session every
``TICK``) and pings silent streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from shmstream import metrics
from shmstream.relay import wire
from shmstream.relay.bells import BellRinger
from shmstream.relay.client import AsyncUpstream, AsyncUpstreamRequest
from shmstream.relay.handoff import TOKEN_KEY, RelayAnswer
from shmstream.relay.producer import Producer
from shmstream.store.errors import ShmstreamError
from shmstream.store.interface import SessionStore

log = logging.getLogger("shmstream.relay.server")

TICK = 0.05  # seconds between two cancel/ping passes: a DELETE lands within two of them
BACKLOG = 4096  # hand-offs waiting to be accepted (a burst of completions, a relay renewal)


class RelayServer:
    """Relays completions handed over by HTTP workers into ``store``."""

    def __init__(self, store: SessionStore, upstream: AsyncUpstream, ping_interval: float,
                 tick: float = TICK):
        self.store = store
        self.upstream = upstream
        self.ping_interval = ping_interval
        self.tick = tick
        self.producers: set[Producer] = set()
        self._handoffs: set[_Handoff] = set()  # hand-off connections open
        self.accepting = False
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task | None = None
        self._idle = asyncio.Event()  # no producer runs
        self._idle.set()
        self.ringer = BellRinger()  # the readers' rings, one datagram per worker per pass

    # --- listening --------------------------------------------------------------------
    async def start(self, sock: socket.socket) -> None:
        """Accept hand-offs on ``sock`` (a listening unix socket, maybe shared with other
        relay processes: whichever accepts a connection serves it)."""
        # asyncio calls listen() again on the socket it is given (100 by default): keep
        # the master's backlog, or a burst of hand-offs beyond 100 fails to connect.
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Handoff(self), sock=sock, backlog=BACKLOG)
        self.accepting = True
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever(),
                                                               name="relay-ticker")

    def stop_accepting(self) -> None:
        """Accept no more hand-offs (the shared listening socket stays open in the master
        and the other relays, so nothing is refused meanwhile)."""
        self.accepting = False
        if self._server is not None:
            self._server.close()

    # --- one hand-off -------------------------------------------------------------------
    def _submitted(self, handoff: _Handoff, message: dict) -> None:
        """A hand-off's submit frame: create the session, answer ``created`` (or
        ``refused``), and when the upstream answers send ``answer`` and, for a stream,
        ring the reader from then on."""
        if message.get("op") != "submit":
            handoff.close()
            return
        bell = self._bell_of(message)

        def on_answer(answer: RelayAnswer) -> None:
            if handoff.closed or handoff.transport.is_closing():
                return  # the caller went away: the generation is not its to stop
            handoff.send({"op": "answer", "status": answer.status,
                          "headers": [list(h) for h in answer.headers], "body": answer.body})
            # A stream: ring from the answer on (in the same step as its frame, so every
            # append the reader's first poll may miss is rung, after the frame).
            if answer.body is None and producer is not None and \
                    producer.add_doorbell(handoff.transport, bell):
                handoff.producer = producer
            else:
                handoff.close()

        reply, producer = self.submit(message, on_answer)
        handoff.send(reply)
        if producer is None:
            handoff.close()

    def _bell_of(self, message: dict) -> tuple[BellRinger, bytes, int] | None:
        """Where the submit asked its rings to go (relay/bells.py); None: its connection."""
        address, number = message.get("bell"), message.get("bell_number")
        if isinstance(address, bytes) and address and isinstance(number, int):
            return self.ringer, address, number
        return None

    def submit(self, message: dict, on_answer: Callable[[RelayAnswer], None]
               ) -> tuple[dict, Producer | None]:
        """Create the session and start its producer: the reply frame for the worker, and
        the producer (None if refused).

        ``on_answer`` is called once with the :class:`RelayAnswer` when the upstream
        answered (in a later loop step: the reply goes out first)."""
        try:
            conversation_id = str(message["conversation_id"])
            headers = [(str(k), str(v)) for k, v in message.get("headers") or []]
            request = AsyncUpstreamRequest(str(message.get("method") or "POST"),
                                           str(message["target"]), headers,
                                           bytes(message.get("body") or b""))
            metadata = dict(message.get("metadata") or {})
        except (KeyError, TypeError, ValueError) as exc:
            return {"op": "refused", "status": 400, "type": "invalid_request_error",
                    "error": "InvalidRequest", "message": f"bad hand-off: {exc}"}, None
        token = secrets.token_hex(8)
        metadata[TOKEN_KEY] = token
        try:
            session = self.store.create_or_replace(conversation_id, metadata=metadata)
        except ShmstreamError as exc:
            return {"op": "refused", "status": exc.status, "type": exc.error_type,
                    "error": type(exc).__name__, "message": exc.message}, None
        except Exception as exc:
            log.exception("relay: create_or_replace failed")
            return {"op": "refused", "status": 500, "type": "server_error",
                    "error": type(exc).__name__, "message": "Internal server error"}, None

        producer = Producer(session, self.upstream, request, self.ping_interval, on_answer)
        replaced = bool(getattr(session, "replaced", False))
        metrics.session_created(replaced)
        log.info("session started id=%s pid=%d route=%s replaced=%s", producer.log_id,
                 os.getpid(), request.target.split("?", 1)[0], "yes" if replaced else "no")
        self.producers.add(producer)
        self._idle.clear()
        producer.start().add_done_callback(lambda _task: self._forget(producer))
        return {"op": "created", "token": token}, producer

    def _forget(self, producer: Producer) -> None:
        self.producers.discard(producer)
        if not self.producers:
            self._idle.set()

    # --- the ticker ---------------------------------------------------------------------
    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            appended = 0
            for producer in list(self.producers):
                try:
                    appended += producer.tick(now)
                except Exception:
                    log.exception("relay tick failed id=%s", producer.log_id)
            if appended:
                metrics.bytes_appended(appended)

    # --- ending ---------------------------------------------------------------------------
    async def drain(self, timeout: float | None) -> int:
        """Stop accepting, let running answers finish for up to ``timeout`` seconds (None:
        as long as they take), then abort what still runs. Returns how many were aborted."""
        self.stop_accepting()
        if self.producers:
            log.info("relay pid %d: draining %d running answer(s)%s", os.getpid(),
                     len(self.producers),
                     f" for up to {timeout:g} s" if timeout is not None else "")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
        return await self.abort_all()

    async def abort_all(self) -> int:
        """End every running session ``aborted`` at once and close its upstream call."""
        self.stop_accepting()
        running = list(self.producers)
        for producer in running:
            producer.stop("abort")
        if running:
            log.warning("relay pid %d: aborted %d running session(s)", os.getpid(),
                        len(running))
            metrics.producers_reaped(len(running), "shutdown")
            await asyncio.gather(*(p.task for p in running if p.task is not None),
                                 return_exceptions=True)
        return len(running)

    async def close(self) -> None:
        """Abort what runs, stop the ticker, release the upstream pool."""
        await self.abort_all()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for handoff in list(self._handoffs):  # doorbells whose readers did not hang up yet
            handoff.close()
        self.ringer.close()
        await self.upstream.aclose()


class _Handoff(asyncio.Protocol):
    """The relay's end of one hand-off connection (a protocol, not asyncio streams: no
    task, reader and writer per completion). The worker sends its submit frame and then
    nothing; it closes the connection when its reader is done, and a connection that
    ends, however early, never stops the generation."""

    def __init__(self, server: RelayServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.producer: Producer | None = None  # rings this connection (a stream's reader)
        self._frame = bytearray()
        self._submitted = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server._handoffs.add(self)

    def data_received(self, data: bytes) -> None:
        if self._submitted:
            return  # nothing more is expected: a worker sends its submit only
        self._frame += data
        try:
            message = wire.take_frame(self._frame)
        except wire.FrameError:
            self.close()
            return
        if message is not None:
            self._submitted = True
            self._frame = bytearray()
            self.server._submitted(self, message)

    def eof_received(self) -> bool:
        self.closed = True  # the worker is done (nothing more is sent to it) ...
        return False  # ... and our side closes too; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server._handoffs.discard(self)
        if self.producer is not None:
            self.producer.remove_doorbell(self.transport)
            self.producer = None

    def send(self, message: dict) -> None:
        if not self.closed and not self.transport.is_closing():
            self.transport.write(wire.encode(message))

    def close(self) -> None:
        """Close after what was sent (the transport flushes it first)."""
        self.closed = True
        self.transport.close()  # idempotent
