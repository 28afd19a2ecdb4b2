"""The hand-off between an HTTP worker and a relay process (the HTTP worker's side, asyncio).

An HTTP worker that accepts a streamed completion does not talk to the upstream itself:

    ticket = await client.submit(RelayRequest(...))   # the relay created the session
    answer = await ticket.answer()                    # the upstream's status line is in
    session = store.get(conversation_id)              # then read it as any reader does
    if session is None or not ticket.owns(session): ...  # replaced meanwhile

- :meth:`RelayClient.submit` returns once a relay process has created (or replaced) the
  session, so the session exists from the request's arrival and its producer identity is
  the relay process, not this worker. It raises what the store raised there
  (``StoreUnavailable`` for a quota or a full store, ``InvalidConversationId``) and
  :class:`RelayUnavailable` (503) when no relay answers within ``submit_timeout``.
- :meth:`RelayTicket.answer` resolves when the upstream answered (after prompt
  processing): a :class:`RelayAnswer` with the upstream's status and headers, and its body
  for a non-2xx answer (PROTOCOL.md rule 2: sent to the caller unchanged); for a stream
  ``body`` is None and the caller's response is the session from offset 0.
- For a stream, :meth:`RelayTicket.doorbell` keeps the connection as a line to the
  producer: the relay rings after every append (one datagram per relay pass for all of
  this process's streams, relay/bells.py) and closes it at the end
  (:class:`RelayDoorbell`). The reader waits on that
  instead of the store's waiter thread and futex: the cheapest wake-up an HTTP worker can
  have, and the one almost every event takes (the request that started an answer reads
  it). If the line breaks the reader falls back to the store's wake-up.
- Closing the ticket (the caller left, the worker is killed) never cancels the
  generation: it only closes this request's connection (PROTOCOL.md rule 4). Cancelling is
  the store's business (DELETE, replace), wherever the producer runs.

The token the relay puts in the session's metadata (``TOKEN_KEY``) tells this request's
session from a later one with the same id.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from shmstream.relay import wire
from shmstream.relay.bells import BellBox, bell_box
from shmstream.store import errors
from shmstream.store.errors import ShmstreamError
from shmstream.store.interface import Session, SessionInfo

SOCKET_ENV = "SHMSTREAM_RELAY_SOCKET"  # set by the gunicorn master for its HTTP workers
TOKEN_KEY = "relay_token"  # in the session's metadata: which request created it
SUBMIT_TIMEOUT = 10.0  # seconds for a relay to accept and create the session


class RelayUnavailable(ShmstreamError):
    """No relay process took the request in time, or the relay went away before the
    upstream answered."""

    status = 503
    error_type = "unavailable_error"
    default_message = "No relay process available"


@dataclass(frozen=True)
class RelayRequest:
    conversation_id: str
    method: str  # "POST"
    target: str  # path + "?" + query as received (still percent-encoded)
    # already filtered for the upstream (no hop-by-hop, no Host, no X-Conversation-Id),
    # names and values as latin-1 text
    headers: list[tuple[str, str]]
    body: bytes
    metadata: dict = field(default_factory=dict)  # for the session (model, ...)


@dataclass(frozen=True)
class RelayAnswer:
    status: int  # the upstream's status line (or 502/503 made by the relay)
    headers: list[tuple[str, str]]  # response headers to pass on (reframed already)
    body: bytes | None  # the error body of a non-2xx answer, unchanged; None for a stream

    @property
    def streams(self) -> bool:
        """Whether the caller's response is the session read from offset 0."""
        return self.body is None


# Errors the relay reports by name; anything else becomes a ShmstreamError of its status.
_REFUSALS: dict[str, type[ShmstreamError]] = {
    cls.__name__: cls for cls in (
        errors.StoreUnavailable, errors.InvalidConversationId, errors.InvalidRequest,
        errors.MissingConversationId, errors.PayloadTooLarge, RelayUnavailable,
    )
}


def refusal_error(message: dict) -> ShmstreamError:
    """The exception a ``refused`` frame stands for."""
    cls = _REFUSALS.get(str(message.get("error")))
    if cls is not None:
        return cls(str(message.get("message") or cls.default_message))
    exc = ShmstreamError(str(message.get("message") or "relay refused the request"))
    exc.status = int(message.get("status") or 500)
    exc.error_type = str(message.get("type") or "server_error")
    return exc


class _Line(asyncio.Protocol):
    """The worker's end of one hand-off connection: frames up to the answer, then the
    doorbell's rings. A protocol of its own, not a StreamReader: after the answer every
    event of the stream takes one wait here, and a flag and a future cost far less than a
    stream read under ``asyncio.timeout`` (~8% of an HTTP worker's time went there)."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.closed = False  # EOF or connection lost
        self.rung = False  # doorbell: a ring came that no wait has taken yet
        self._frames = bytearray()  # before the answer: bytes of frames to come
        self._ringing = False
        self._waiter: asyncio.Future | None = None
        # Python 3.11's get_running_loop() makes a getpid() syscall: once, not per wait.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._box: BellBox | None = None  # where this stream's rings come, by number
        self.bell_number = 0
        # wait()'s timeout without a timer per wait (arming and cancelling one cost ~2 µs
        # of every event): one timer, moved on lazily when it fires before the deadline.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self._ringing:
            self.rung = True
        else:
            self._frames += data
        self._wake()

    def use_bell_box(self, box: BellBox) -> None:
        """Take rings from ``box`` (one datagram per relay pass for all of this process's
        streams) instead of bytes on this connection."""
        self._box = box
        self.bell_number = box.register(self.ring)

    def ring(self) -> None:
        """A ring from the bell box. One may come before the answer frame is read (two
        sockets, no order between them): it counts once ringing starts."""
        self.rung = True
        if self._ringing:
            self._wake()

    def _leave_box(self) -> None:
        if self._box is not None:
            self._box.unregister(self.bell_number)
            self._box = None

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._leave_box()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None = None) -> None:
        """Until the next bytes, the end of the connection, or ``timeout`` seconds."""
        loop = self._loop or asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        if timeout is None:
            self._deadline = None
        else:
            self._deadline = deadline = loop.time() + timeout
            if self._timer is None or self._timer_at > deadline:
                self._arm(loop, deadline)
        try:
            await waiter
        finally:
            self._waiter = None

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if self._waiter is None or deadline is None or self.closed:
            return  # no timed wait now: the next one arms a timer again
        loop = self._loop or asyncio.get_running_loop()
        if loop.time() >= deadline:
            self._wake()
        else:
            self._arm(loop, deadline)  # this wait began after the timer was armed

    def send(self, message: dict) -> None:
        """Queue one frame (the transport buffers it; the relay reads it at once)."""
        self.transport.write(wire.encode(message))

    async def read_frame(self) -> dict | None:
        """The next frame, or None if the connection ended between frames. Raises
        FrameError for a malformed frame or an end inside one."""
        while True:
            message = wire.take_frame(self._frames)
            if message is not None:
                return message
            if self.closed:
                if self._frames:
                    raise wire.FrameError("connection closed inside a frame")
                return None
            await self.wait()

    def start_ringing(self) -> None:
        """From now on bytes are rings (any that came after the answer frame count)."""
        self._ringing = True
        self.rung = self.rung or bool(self._frames)
        self._frames = bytearray()

    def close(self) -> None:
        self.closed = True
        self._leave_box()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()
        self._wake()


class RelayDoorbell:
    """The hand-off connection after a streaming answer. The relay rings after each append
    (through this process's bell box, relay/bells.py, or with one byte on the connection
    when there is none) and closes the connection after the end, so :meth:`wait` returns
    on a ring or EOF (EOF, or a relay that died: ``alive`` turns False) or after
    ``timeout``. A ring from before the reader's last poll only makes it poll once more:
    it reads all that piled up at once."""

    def __init__(self, line: _Line):
        self._line = line
        line.start_ringing()

    @property
    def alive(self) -> bool:
        return not self._line.closed

    async def wait(self, timeout: float) -> None:
        line = self._line
        if not line.rung and not line.closed:
            await line.wait(timeout)
        line.rung = False

    def close(self) -> None:
        self._line.close()


class RelayTicket:
    """A submitted request: the session's token, and the upstream's answer to come.

    Holds the request's connection to its relay until :meth:`answer` resolved or
    :meth:`close` was called; neither cancels the generation. After a streaming answer
    :meth:`doorbell` takes the connection over."""

    def __init__(self, conversation_id: str, token: str, line: _Line):
        self.conversation_id = conversation_id
        self.token = token
        self._line: _Line | None = line
        self._answer: RelayAnswer | None = None

    def owns(self, session: Session | SessionInfo) -> bool:
        """Whether ``session`` (a handle, or its info) is the one this request created, not
        a later replacement. A handle is checked by its metadata alone (cheaper than
        ``info()``, which also checks the producer's liveness)."""
        metadata = session.metadata() if isinstance(session, Session) else session.metadata
        return session.conversation_id == self.conversation_id and \
            metadata.get(TOKEN_KEY) == self.token

    async def answer(self) -> RelayAnswer:
        """The upstream's answer (waits through prompt processing).

        Raises :class:`RelayUnavailable` when the relay went away first (its session then
        ends ``aborted``). Idempotent: a second call returns the same answer."""
        if self._answer is not None:
            return self._answer
        if self._line is None:
            raise RelayUnavailable("relay ticket closed before the upstream answered")
        try:
            message = await self._line.read_frame()
        except wire.FrameError:
            message = None
        except BaseException:
            self.close()
            raise
        if message is None or message.get("op") != "answer":
            self.close()
            raise RelayUnavailable("relay process went away before the upstream answered")
        body = message.get("body")
        self._answer = RelayAnswer(
            status=int(message["status"]),
            headers=[(str(k), str(v)) for k, v in message.get("headers") or []],
            body=bytes(body) if body is not None else None,
        )
        if not self._answer.streams:
            self.close()  # a stream keeps the connection for doorbell()
        return self._answer

    def doorbell(self) -> RelayDoorbell | None:
        """After a streaming answer: the connection, as the reader's line to the producer
        (the caller closes it); None if the ticket was closed."""
        line, self._line = self._line, None
        return RelayDoorbell(line) if line is not None else None

    def close(self) -> None:
        """Drop the connection (the caller left): the generation goes on."""
        line, self._line = self._line, None
        if line is not None:
            line.close()

    async def __aenter__(self) -> RelayTicket:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()


class RelayClient:
    """One per HTTP worker process: submits completions to the relay processes listening
    on ``socket_path`` (whichever relay accepts the connection takes the request).

    Holds no connection between requests, so it may be used from any event loop."""

    def __init__(self, socket_path: str, submit_timeout: float = SUBMIT_TIMEOUT):
        self.socket_path = socket_path
        self.submit_timeout = submit_timeout

    @classmethod
    def from_env(cls, environ: dict | None = None) -> RelayClient:
        """The client for the relays of this service (``SHMSTREAM_RELAY_SOCKET``).

        Raises RuntimeError when the variable is unset (not started by shmstream's
        gunicorn hooks: use :class:`~shmstream.relay.local.LocalRelay` to embed)."""
        environ = os.environ if environ is None else environ
        path = environ.get(SOCKET_ENV)
        if not path:
            raise RuntimeError(f"{SOCKET_ENV} is not set: no relay processes to hand "
                               "completions to (start through shmstream's gunicorn config, "
                               "or embed a LocalRelay)")
        return cls(path)

    async def submit(self, request: RelayRequest) -> RelayTicket:
        """Hand ``request`` to a relay; returns once the session was created.

        Raises the store's refusal (StoreUnavailable, InvalidConversationId, ...) or
        :class:`RelayUnavailable` when no relay answers within ``submit_timeout``."""
        try:
            async with asyncio.timeout(self.submit_timeout):
                return await self._submit(request)
        except TimeoutError:
            raise RelayUnavailable(
                f"no relay process answered within {self.submit_timeout:g} s") from None

    async def _submit(self, request: RelayRequest) -> RelayTicket:
        loop = asyncio.get_running_loop()
        try:
            _, line = await loop.create_unix_connection(_Line, self.socket_path)
        except OSError as exc:
            raise RelayUnavailable(f"cannot reach the relay processes: {exc}") from None
        box = bell_box()
        bell = {}
        if box is not None:
            line.use_bell_box(box)
            bell = {"bell": box.address, "bell_number": line.bell_number}
        try:
            line.send({
                "op": "submit",
                "conversation_id": request.conversation_id,
                "method": request.method,
                "target": request.target,
                "headers": [list(pair) for pair in request.headers],
                "body": request.body,
                "metadata": request.metadata,
                **bell,
            })
            message = await line.read_frame()
        except (OSError, wire.FrameError) as exc:
            line.close()
            raise RelayUnavailable(f"relay connection failed: {exc}") from None
        except BaseException:
            line.close()
            raise
        if message is not None and message.get("op") == "created":
            return RelayTicket(request.conversation_id, str(message["token"]), line)
        line.close()
        if message is not None and message.get("op") == "refused":
            raise refusal_error(message)
        raise RelayUnavailable("relay closed the connection before creating the session")
