"""The HTTP resources: parse the request, call the store or the relay, map errors.

They use only the :class:`~shmstream.store.SessionStore` interface and the
:mod:`shmstream.relay.upstream` relay; exceptions from :mod:`shmstream.store.errors`
become error bodies in one handler (:mod:`shmstream.http.app`).
"""

from __future__ import annotations

import json
import logging
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl, quote, unquote_to_bytes

import falcon

from shmstream import metrics
from shmstream.relay.upstream import (
    JSON_TYPE,
    Relay,
    Upstream,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    request_headers,
    response_headers,
)
from shmstream.store.errors import (
    InvalidConversationId,
    InvalidOffset,
    InvalidRequest,
    MissingConversationId,
    OffsetLost,
    PayloadTooLarge,
    SessionNotFound,
)
from shmstream.store.ids import short_hash
from shmstream.store.interface import Session, SessionStore

log = logging.getLogger("shmstream.http")

COMPLETION_ROUTES = frozenset({
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
    "/completion", "/v1/responses", "/v1/messages", "/infill",
})
STREAM_PREFIX = "/v1/stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_OFFSET = 2**63
MAX_LOOKUP_BODY = 1024 * 1024
MAX_LOOKUP_IDS = 1000
MAX_CONVERSATION_ID_BYTES = 512  # UTF-8 bytes; the store itself takes up to 16 KiB
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
MAX_COMPLETION_BODY = 64 * 1024 * 1024  # parsed to find "stream"; images make bodies big
CLIENT_CHECK_INTERVAL = 0.05  # seconds between two polls of a reader's socket
_DIGITS = re.compile(rb"[0-9]*")
_POLL_GONE = select.POLLHUP | select.POLLERR | getattr(select, "POLLNVAL", 0)
_POLL_MASK = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)


# --- request parsing ----------------------------------------------------------------------


def wsgi_bytes(text: str) -> bytes:
    """WSGI hands header values, paths and query strings as latin-1 text: the raw bytes."""
    return text.encode("latin-1")


def utf8_id(raw: bytes) -> str:
    """A conversation id from its bytes. Raises MissingConversationId for empty ids and
    InvalidConversationId for bytes that are not UTF-8, longer than
    ``MAX_CONVERSATION_ID_BYTES`` or with control characters."""
    if not raw:
        raise MissingConversationId()
    if len(raw) > MAX_CONVERSATION_ID_BYTES:
        raise InvalidConversationId(
            f"Invalid conversation id: longer than {MAX_CONVERSATION_ID_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidConversationId("Invalid conversation id: not valid UTF-8") from None
    if _CONTROL_CHARACTERS.search(text):
        raise InvalidConversationId("Invalid conversation id: contains control characters")
    return text


def acceptable_id(value) -> bool:
    """Whether a lookup entry is an id the HTTP layer accepts (others are ignored)."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_CONVERSATION_ID_BYTES
            and len(value.encode("utf-8", "surrogatepass")) <= MAX_CONVERSATION_ID_BYTES
            and not _CONTROL_CHARACTERS.search(value))


def raw_path(environ: dict) -> tuple[bytes, bool]:
    """The request path as bytes, and whether it is still percent-encoded.

    gunicorn decodes ``PATH_INFO`` (so ``%2F`` became ``/``); ``RAW_URI`` (gunicorn) or
    ``REQUEST_URI`` (others) is the target as sent.
    """
    for key in ("RAW_URI", "REQUEST_URI"):
        target = environ.get(key)
        if target:
            path = wsgi_bytes(target).split(b"?", 1)[0].split(b"#", 1)[0]
            if b"://" in path[:16]:  # absolute-form request target
                after = path.split(b"://", 1)[1]
                path = b"/" + after.split(b"/", 1)[1] if b"/" in after else b"/"
            script = wsgi_bytes(environ.get("SCRIPT_NAME", ""))
            if script and path.startswith(script):
                path = path[len(script):]
            return path, True
    return wsgi_bytes(environ.get("PATH_INFO", "")), False


def query_params(environ: dict) -> dict[str, bytes]:
    """The query's parameters (first value wins, like llama-server's), decoded to bytes."""
    params: dict[str, bytes] = {}
    # latin-1 both ways: every percent-decoded byte maps to one character and back.
    for key, value in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True,
                                encoding="latin-1"):
        params.setdefault(key, value.encode("latin-1"))
    return params


def stream_conversation_id(environ: dict) -> str:
    """The id of a ``/v1/stream/{id}`` or ``/v1/stream?conv_id=`` request."""
    path, encoded = raw_path(environ)
    prefix = STREAM_PREFIX.encode() + b"/"
    if path.startswith(prefix):
        rest = path[len(prefix):]
        return utf8_id(unquote_to_bytes(rest) if encoded else rest)
    return utf8_id(query_params(environ).get("conv_id", b""))


def parse_offset(environ: dict) -> int:
    """``from``: ASCII digits below 2^63; empty or absent is 0. Raises InvalidOffset."""
    raw = query_params(environ).get("from", b"")
    if not _DIGITS.fullmatch(raw):
        raise InvalidOffset()
    offset = int(raw) if raw else 0
    if offset >= MAX_OFFSET:
        raise InvalidOffset()
    return offset


def header_conversation_id(environ: dict) -> str | None:
    """The ``X-Conversation-Id`` header as text; None when absent or empty."""
    value = environ.get("HTTP_X_CONVERSATION_ID")
    if not value:
        return None
    return utf8_id(wsgi_bytes(value))


def read_body(environ: dict, limit: int) -> bytes:
    """The whole request body (Content-Length or chunked). Raises PayloadTooLarge."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length") from None
        if size > limit:
            raise PayloadTooLarge()
        return stream.read(size) if size > 0 else b""
    if not environ.get("wsgi.input_terminated"):
        return b""
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge()
    return body


def body_chunks(environ: dict, size: int = 64 * 1024) -> Iterator[bytes] | bytes:
    """The request body for streaming to the upstream, without holding it in memory."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        remaining = int(length)

        def bounded() -> Iterator[bytes]:
            nonlocal remaining
            while remaining > 0:
                chunk = stream.read(min(size, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

        return bounded() if remaining > 0 else b""
    if environ.get("wsgi.input_terminated"):
        return iter(lambda: stream.read(size), b"")
    return b""


# --- noticing a gone client ---------------------------------------------------------------


class ClientWatch:
    """``should_stop`` for a reader: True once its client hung up.

    gunicorn notices a gone client only when a write fails, which may be seconds away on a
    silent stream; polling the socket for a hang-up frees the thread within one reader wake.
    Bytes the client sent (a pipelined request) make the socket readable but are no hang-up:
    only an EOF seen with ``MSG_PEEK`` is.
    """

    def __init__(self, environ: dict, interval: float = CLIENT_CHECK_INTERVAL):
        self._sock: socket.socket | None = environ.get("gunicorn.socket")
        self._interval = interval
        self._next = 0.0
        self._gone = False
        self._poller = None
        if self._sock is not None:
            try:
                self._poller = select.poll()
                self._poller.register(self._sock.fileno(), _POLL_MASK)
            except (OSError, ValueError):
                self._poller = None

    def __call__(self) -> bool:
        if self._gone:
            return True
        if self._poller is None:
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval
        try:
            events = self._poller.poll(0)
        except OSError:
            events = [(0, select.POLLERR)]
        for _, mask in events:
            if mask & _POLL_GONE:
                self._gone = True
            elif mask:  # POLLRDHUP: the peer shut its side; gone unless bytes are pending
                self._gone = self._peek_eof()
        return self._gone

    def _peek_eof(self) -> bool:
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


# --- response bodies ----------------------------------------------------------------------


class SessionBody:
    """A response body that reads a session live; ``close()`` (the WSGI server calls it)
    releases the handle. Ends quietly when the reader is lapped (the client re-attaches
    and gets the ``offset lost`` answer)."""

    def __init__(self, session: Session, offset: int, should_stop: Callable[[], bool]):
        self._session: Session | None = session
        self._chunks = session.read(offset, should_stop=should_stop)
        metrics.reader_attached()

    def __iter__(self) -> SessionBody:
        return self

    def __next__(self) -> bytes:
        if self._session is None:
            raise StopIteration
        try:
            return next(self._chunks)
        except OffsetLost:
            metrics.offset_lost("lapped")
            self.close()
            raise StopIteration from None
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            metrics.reader_detached()
            self._chunks.close()
            session.close()


class UpstreamBody:
    """The upstream's raw body, relayed as it arrives; ``close()`` releases the upstream
    connection."""

    def __init__(self, response: UpstreamResponse):
        self._response = response
        self._chunks = response.iter_raw()

    def __iter__(self) -> UpstreamBody:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        self._response.close()


def _sse_response(resp: falcon.Response, status: int, headers: list[tuple[str, str]]) -> None:
    resp.status = status
    for name, value in headers:
        resp.append_header(name, value)
    if not resp.get_header("Content-Type"):
        resp.content_type = "text/event-stream"
    for name, value in SSE_HEADERS.items():
        resp.set_header(name, value)


# --- resources ----------------------------------------------------------------------------


class StreamResource:
    """``GET``/``DELETE`` ``/v1/stream/{id}`` and ``/v1/stream?conv_id=`` (a sink: the id
    comes from the raw URI and may contain slashes)."""

    def __init__(self, store: SessionStore):
        self.store = store

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_) -> None:
        if req.method == "GET":
            self.on_get(req, resp)
        elif req.method == "DELETE":
            self.on_delete(req, resp)
        else:
            raise falcon.HTTPMethodNotAllowed(["GET", "DELETE"])

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        conversation_id = stream_conversation_id(req.env)
        session = self.store.get(conversation_id)
        if session is None:
            raise SessionNotFound()
        try:
            offset = parse_offset(req.env)
            if offset < session.info().dropped_bytes:
                metrics.offset_lost("attach")
                raise OffsetLost()
        except BaseException:
            session.close()
            raise
        _sse_response(resp, 200, [])
        resp.stream = SessionBody(session, offset, ClientWatch(req.env))

    def on_delete(self, req: falcon.Request, resp: falcon.Response) -> None:
        conversation_id = stream_conversation_id(req.env)
        found = self.store.evict_and_cancel(conversation_id)
        log.info("stop requested id=%s found=%s", short_hash(conversation_id), found)
        resp.status = 204


class LookupResource:
    """``POST /v1/streams/lookup``: the sessions of ids the caller already knows."""

    def __init__(self, store: SessionStore):
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        raw = read_body(req.env, MAX_LOOKUP_BODY)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"invalid body: {exc}") from None
        wanted = body.get("conversation_ids") if isinstance(body, dict) else None
        if isinstance(wanted, list) and len(wanted) > MAX_LOOKUP_IDS:
            raise InvalidRequest(f"too many conversation ids: at most {MAX_LOOKUP_IDS}")
        ids = [v for v in wanted if acceptable_id(v)] if isinstance(wanted, list) else []
        infos = self.store.lookup(ids) if ids else []
        resp.content_type = JSON_TYPE
        resp.data = json.dumps([info.lookup_entry() for info in infos]).encode()


class ProxyResource:
    """Every other path: completions with ``"stream": true`` and a conversation id become
    sessions; everything else is relayed to the upstream as is, streaming both ways."""

    def __init__(self, relay: Relay, upstream: Upstream, upstream_api_key: str | None = None):
        self.relay = relay
        self.upstream = upstream
        self.upstream_api_key = upstream_api_key

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_) -> None:
        if req.method == "POST" and req.path in COMPLETION_ROUTES:
            self.completion(req, resp)
        else:
            self.proxy(req, resp)

    @staticmethod
    def _target(environ: dict) -> str:
        path, encoded = raw_path(environ)
        if not encoded:  # a decoded PATH_INFO: encode it again for the request line
            path = quote(path, safe="/:@!$&'()*+,;=-._~").encode("ascii")
        query = environ.get("QUERY_STRING", "")
        target = path.decode("latin-1") or "/"
        return f"{target}?{query}" if query else target

    def completion(self, req: falcon.Request, resp: falcon.Response) -> None:
        conversation_id = header_conversation_id(req.env)
        body = read_body(req.env, MAX_COMPLETION_BODY)
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if conversation_id is None or not isinstance(parsed, dict) \
                or parsed.get("stream") is not True:
            self.proxy(req, resp, body=body)
            return
        request = UpstreamRequest(
            method="POST", target=self._target(req.env),
            headers=request_headers(req.env, self.upstream_api_key, identity=True,
                                    with_length=False),
            body=body,
        )
        model = parsed.get("model")
        metadata = {"model": model} if isinstance(model, str) else {}
        producer, reader = self.relay.start(conversation_id, request, metadata)
        watch = ClientWatch(req.env)
        answer = producer.wait_answer(should_stop=watch)
        if answer is None or answer.body is not None:
            reader.close()
            if answer is None:  # the caller left before the upstream answered
                resp.status = 200
                resp.content_type = "text/event-stream"
                resp.data = b""
                return
            resp.status = answer.status
            for name, value in answer.headers:
                resp.append_header(name, value)
            resp.data = answer.body
            return
        _sse_response(resp, answer.status, answer.headers)
        resp.stream = SessionBody(reader, 0, watch)

    def proxy(self, req: falcon.Request, resp: falcon.Response,
              body: bytes | None = None) -> None:
        request = UpstreamRequest(
            method=req.method, target=self._target(req.env),
            headers=request_headers(req.env, self.upstream_api_key,
                                    with_length=body is None),
            body=body_chunks(req.env) if body is None else body,
        )
        try:
            response = self.upstream.open(request)
        except UpstreamError:
            metrics.upstream_error("proxy")
            raise
        resp.status = response.status
        for name, value in response_headers(response.headers):
            resp.append_header(name, value)
        if req.method == "HEAD" or response.status in (204, 304) or response.status < 200:
            response.close()  # no body; Falcon would drop the iterator without closing it
            return
        resp.stream = UpstreamBody(response)
