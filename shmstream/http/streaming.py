"""Response bodies that stream on the event loop and end when the client leaves.

Falcon iterates ``resp.stream`` and sends each chunk (awaiting the server's flow control,
so a slow client never buffers without bound), but it does not listen for
``http.disconnect`` while it streams. :func:`with_client_link` wraps the ASGI app so each
request's ``receive`` goes through a :class:`ClientLink` (``req.scope[LINK_KEY]``), whose
one listener task per request hears the disconnect; a streaming body registers a callback
on that link and, like Starlette's ``StreamingResponse``, cancels the body's wait the
moment the client goes, even while no bytes flow. A chunk costs no extra task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from shmstream import metrics
from shmstream.store.errors import OffsetLost, StoreUnavailable
from shmstream.store.interface import ProducerDoorbell, Session

LINK_KEY = "shmstream.client"


class ClientLink:
    """One request's ``receive``, seen by the app and by its streaming body.

    The app reads the request body through :meth:`receive` as usual; once it streams or
    waits, :meth:`on_gone` callbacks run when the server reports ``http.disconnect`` (the
    body is complete by then, so the server answers ``receive`` only when the client
    leaves). One
    listener task per request calls ``receive`` for that and is cancelled only when the
    request is over: a server may treat a cancelled ``receive`` as the end of the
    connection (gunicorn's asgi worker then answers every later one with a disconnect)."""

    def __init__(self, receive: Callable[[], Awaitable[dict]]):
        self._receive = receive
        self._gone = False
        self._listener: asyncio.Task | None = None
        self._callbacks: list[Callable[[], None]] = []

    @property
    def disconnected(self) -> bool:
        return self._gone

    async def receive(self) -> dict:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self._gone:
            self._gone = True
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()
        return message

    async def _listen(self) -> None:
        while not self._gone:
            await self.receive()  # request body left unread is dropped

    def _start_listening(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    def on_gone(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` once, from the listener's step, when the client disconnects
        (at once if it has). Returns what takes it back. A callback costs no task of its
        own: a task per wait was a few percent of a worker at thousands of setups a
        second."""
        if self._gone:
            callback()
            return _nothing
        self._start_listening()
        self._callbacks.append(callback)

        def forget() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)
        return forget

    def close(self) -> None:
        """The request is over: stop listening."""
        if self._listener is not None and not self._listener.done():
            self._listener.cancel()


def _nothing() -> None:
    pass


def with_client_link(app):
    """The ASGI app ``app`` with a :class:`ClientLink` in every HTTP request's scope."""

    async def application(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        link = ClientLink(receive)
        scope[LINK_KEY] = link
        try:
            await app(scope, link.receive, send)
        finally:
            link.close()

    application.falcon_app = app
    return application


class ClientBoundStream:
    """An async iterator over ``chunks`` that ends (``StopAsyncIteration``) when the
    client disconnects, also in the middle of a wait for the next chunk. ``close()``
    (Falcon calls it after the last chunk) stops the watcher and runs ``on_close``."""

    def __init__(self, chunks: AsyncIterator[bytes], link: ClientLink | None,
                 on_close: Callable[[], Awaitable[None] | None] | None = None,
                 ends_quietly: tuple[type[BaseException], ...] = (),
                 on_quiet_end: Callable[[BaseException], None] | None = None):
        self._chunks = chunks
        self._next = chunks.__anext__
        self._link = link
        self._on_close = on_close
        # errors of ``chunks`` that end the body as if it ended (``on_quiet_end`` hears why)
        self._ends_quietly = ends_quietly
        self._on_quiet_end = on_quiet_end
        self._task: asyncio.Task | None = None
        self._forget_link: Callable[[], None] | None = None
        self._waiting = False
        self._cancelled_by_us = False
        self._closed = False

    def __aiter__(self) -> ClientBoundStream:
        return self

    async def __anext__(self) -> bytes:
        link = self._link
        if self._closed or (link is not None and link.disconnected):
            raise StopAsyncIteration
        if self._task is None and link is not None:
            self._task = asyncio.current_task()
            self._forget_link = link.on_gone(self._client_left)
        self._waiting = True
        try:
            return await self._next()
        except asyncio.CancelledError:
            # Ours (the client left): end the body. Anyone else's: let it through.
            if self._cancelled_by_us and self._task is not None and \
                    self._task.uncancel() == 0:
                raise StopAsyncIteration from None
            raise
        except self._ends_quietly as exc:
            if self._on_quiet_end is not None:
                self._on_quiet_end(exc)
            raise StopAsyncIteration from None
        finally:
            self._waiting = False

    def _client_left(self) -> None:
        if self._waiting and self._task is not None and not self._closed:
            self._cancelled_by_us = True
            self._task.cancel()  # lands in __anext__'s await (the body's wait)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._forget_link is not None:
            self._forget_link()
            self._forget_link = None
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if self._on_close is not None:
            result = self._on_close()
            if result is not None:
                await result


def _ended_quietly(exc: BaseException) -> None:
    if isinstance(exc, OffsetLost):
        metrics.offset_lost("lapped")


def session_body(session: Session, offset: int, link: ClientLink | None,
                 wake_interval: float, doorbell: ProducerDoorbell | None = None
                 ) -> ClientBoundStream:
    """A response body reading ``session`` live from ``offset``, woken by ``doorbell``
    (the request's line to the producer) while it works; it closes the handle and the
    doorbell. It ends quietly when the reader is lapped (the client re-attaches and gets
    the ``offset lost`` answer) or the store goes away (the store logged that once for
    the process; a re-attach gets 503 until it is back)."""
    metrics.reader_attached()

    def release() -> None:
        metrics.reader_detached()
        if doorbell is not None:
            doorbell.close()
        session.close()

    return ClientBoundStream(
        session.aread(offset, wake_interval=wake_interval, doorbell=doorbell), link, release,
        ends_quietly=(OffsetLost, StoreUnavailable), on_quiet_end=_ended_quietly)
