"""The HTTP resources: parse the request, call the store, the relay or the proxy, map errors.

They use only the :class:`~shmstream.store.SessionStore` interface, the relay hand-off
(:mod:`shmstream.relay.handoff`) and the proxy; exceptions from
:mod:`shmstream.store.errors` become error bodies in one handler (:mod:`shmstream.http.app`).
Every responder is a coroutine; a reader costs a coroutine and its socket, not a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import falcon

from shmstream import metrics
from shmstream.http import parsing
from shmstream.http.parsing import STREAM_PREFIX
from shmstream.http.proxy import Proxy, relay_answer
from shmstream.http.streaming import LINK_KEY, ClientLink, session_body
from shmstream.http.webui import StaticFile
from shmstream.relay.handoff import RelayClient, RelayRequest, RelayTicket
from shmstream.relay.upstream import JSON_TYPE, UpstreamError
from shmstream.store.errors import InvalidRequest, OffsetLost, SessionNotFound
from shmstream.store.ids import short_hash
from shmstream.store.interface import Session, SessionStore

log = logging.getLogger("shmstream.http")

COMPLETION_ROUTES = frozenset({
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
    "/completion", "/v1/responses", "/responses", "/v1/messages", "/infill",
})
FAVICON_PATH = "/favicon.ico"
SSE_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_LOOKUP_BODY = 1024 * 1024
MAX_LOOKUP_IDS = 1000
MAX_COMPLETION_BODY = 64 * 1024 * 1024  # parsed to find "stream"; images make bodies big
# A waiting reader polls its session at least this often even without a wake-up: only a
# safety net behind the store's notifications, which end readers at once on any terminal
# state (a gone client is noticed at once too). Not 1 s: with pings every second that
# doubled the wake-ups of idle readers.
READER_RECHECK = 3.0


def _sse_response(resp: falcon.Response, status: int, headers: list[tuple[str, str]]) -> None:
    resp.status = status
    for name, value in headers:
        resp.append_header(name, value)
    if not resp.get_header("Content-Type"):
        resp.content_type = SSE_TYPE
    for name, value in SSE_HEADERS.items():
        resp.set_header(name, value)


def _link(req: falcon.Request) -> ClientLink | None:
    return req.scope.get(LINK_KEY)


class StreamResource:
    """``GET``/``DELETE`` ``/v1/stream/{id}`` and ``/v1/stream?conv_id=`` (a sink: the id
    comes from the raw path and may contain slashes)."""

    def __init__(self, store: SessionStore):
        self.store = store

    async def __call__(self, req: falcon.Request, resp: falcon.Response, **_) -> None:
        if req.method == "GET":
            await self.on_get(req, resp)
        elif req.method == "DELETE":
            await self.on_delete(req, resp)
        else:
            raise falcon.HTTPMethodNotAllowed(["GET", "DELETE"])

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        conversation_id = parsing.stream_conversation_id(req)
        session = self.store.get(conversation_id)
        if session is None:
            raise SessionNotFound()
        try:
            offset = parsing.parse_offset(req)
            if offset < session.info().dropped_bytes:
                metrics.offset_lost("attach")
                raise OffsetLost()
        except BaseException:
            session.close()
            raise
        _sse_response(resp, 200, [])
        resp.stream = session_body(session, offset, _link(req), READER_RECHECK)

    async def on_delete(self, req: falcon.Request, resp: falcon.Response) -> None:
        conversation_id = parsing.stream_conversation_id(req)
        found = self.store.evict_and_cancel(conversation_id)
        log.info("stop requested id=%s found=%s", short_hash(conversation_id), found)
        resp.status = 204


class LookupResource:
    """``POST /v1/streams/lookup``: the sessions of ids the caller already knows."""

    def __init__(self, store: SessionStore):
        self.store = store

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        raw = await parsing.read_body(req, MAX_LOOKUP_BODY)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"invalid body: {exc}") from None
        wanted = body.get("conversation_ids") if isinstance(body, dict) else None
        if isinstance(wanted, list) and len(wanted) > MAX_LOOKUP_IDS:
            raise InvalidRequest(f"too many conversation ids: at most {MAX_LOOKUP_IDS}")
        ids = [v for v in wanted if parsing.acceptable_id(v)] if isinstance(wanted, list) else []
        infos = self.store.lookup(ids) if ids else []
        resp.content_type = JSON_TYPE
        resp.data = json.dumps([info.lookup_entry() for info in infos]).encode()


class ProxyResource:
    """Every other path: completions with ``"stream": true`` and a conversation id are
    handed to a relay process and answered by reading their session; everything else is
    relayed to the upstream as is, streaming both ways."""

    def __init__(self, store: SessionStore, relay: RelayClient, proxy: Proxy,
                 upstream_api_key: str | None = None, icon: StaticFile | None = None):
        self.store = store
        self.relay = relay
        self.proxy = proxy
        self.upstream_api_key = upstream_api_key
        self.icon = icon

    async def __call__(self, req: falcon.Request, resp: falcon.Response, **_) -> None:
        if req.method == "POST" and req.path in COMPLETION_ROUTES:
            await self.completion(req, resp)
        elif req.path == FAVICON_PATH and req.method in ("GET", "HEAD") and self.icon:
            await self.favicon(req, resp)
        else:
            await relay_answer(req, resp, await self.proxy.open(req))

    async def favicon(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The upstream's icon if it has one, else ours (browsers ask on every load)."""
        try:
            answer = await self.proxy.open(req)
        except UpstreamError:
            answer = None
        if answer is not None and answer.status != 404:
            await relay_answer(req, resp, answer)
            return
        if answer is not None:
            with contextlib.suppress(Exception):
                await answer.close()
        resp.content_type = self.icon.content_type
        resp.cache_control = ["max-age=86400"]
        resp.data = self.icon.data

    async def completion(self, req: falcon.Request, resp: falcon.Response) -> None:
        conversation_id = parsing.header_conversation_id(req)
        body = await parsing.read_body(req, MAX_COMPLETION_BODY)
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if conversation_id is None or not isinstance(parsed, dict) \
                or parsed.get("stream") is not True:
            await relay_answer(req, resp, await self.proxy.open(req, body=body))
            return
        model = parsed.get("model")
        request = RelayRequest(
            conversation_id=conversation_id, method="POST", target=parsing.target(req),
            headers=parsing.forward_headers(req, self.upstream_api_key, identity=True,
                                            with_length=False),
            body=body, metadata={"model": model} if isinstance(model, str) else {},
        )
        ticket = await self.relay.submit(request)
        session = None
        try:
            session = self._own_session(ticket)
            answer = await self._answer_unless_gone(ticket, _link(req))
        except BaseException:
            if session is not None:
                session.close()
            ticket.close()
            raise
        if answer is None or not answer.streams or session is None:
            ticket.close()
            if session is not None:
                session.close()
            if answer is None:  # the caller left before the upstream answered
                resp.status = 200
                resp.content_type = SSE_TYPE
                resp.data = b""
                return
            resp.status = answer.status
            for name, value in answer.headers:
                resp.append_header(name, value)
            if answer.body is not None:
                resp.data = answer.body
                return
            # The session was replaced before we could open it: an empty stream (the
            # client's lookup finds the newer one).
            _sse_response(resp, answer.status, [])
            resp.data = b""
            return
        _sse_response(resp, answer.status, answer.headers)
        resp.stream = session_body(session, 0, _link(req), READER_RECHECK, ticket.doorbell())

    def _own_session(self, ticket: RelayTicket) -> Session | None:
        """This request's session, or None if a later request replaced it already."""
        session = self.store.get(ticket.conversation_id)
        if session is None:
            return None
        try:
            owned = ticket.owns(session)
        except BaseException:
            session.close()
            raise
        if not owned:
            session.close()
            return None
        return session

    @staticmethod
    async def _answer_unless_gone(ticket: RelayTicket, link: ClientLink | None):
        """The relay's answer, or None when the client leaves first (the generation goes
        on: closing the ticket never cancels it). The caller closes the ticket."""
        if link is None:
            return await ticket.answer()
        # The client's leaving cancels this very wait (no task of its own per request).
        task = asyncio.current_task()
        left = False

        def client_left() -> None:
            nonlocal left
            left = True
            task.cancel()
        forget = link.on_gone(client_left)
        try:
            return await ticket.answer()
        except asyncio.CancelledError:
            if left and task.uncancel() == 0:
                return None  # ours: the client left
            raise
        finally:
            forget()


__all__ = ["COMPLETION_ROUTES", "STREAM_PREFIX", "LookupResource", "ProxyResource",
           "StreamResource"]
