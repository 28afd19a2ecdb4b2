"""Relaying the upstream: an ``Upstream`` interface, its httpx implementation, and the
producer threads that pump a streamed completion into a session.

The pieces, from the bottom:

- :class:`Abort` cuts one upstream call from any thread at any moment: while connecting,
  while waiting for the status line (prompt processing), or mid-body. For HTTP it shuts the
  call's socket down (``shutdown`` wakes a blocked ``recv``; ``close`` from another thread
  does not), so the upstream sees its client go and stops generating.
- :class:`Upstream` / :class:`UpstreamResponse`: what the HTTP layer needs from an
  OpenAI-compatible server. :class:`HttpUpstream` is the real one (pooled httpx client);
  :mod:`shmstream.relay.demo` is an in-process one.
- :class:`Producer`: one thread per streamed completion. It sends the request, hands the
  upstream's answer (status line or error) to the waiting caller, appends every body byte to
  the session, and always finalizes and closes the session.
- :class:`ProducerWatcher`: one thread per process that, every ``period`` seconds, aborts
  local producers whose session was cancelled (by DELETE or a replacing request in any
  process) and appends a ``:\\n\\n`` ping to sessions whose upstream is silent.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import httpcore
import httpx

from shmstream import metrics
from shmstream.store.errors import ShmstreamError
from shmstream.store.ids import short_hash
from shmstream.store.interface import Session, SessionStore
from shmstream.store.states import State

log = logging.getLogger("shmstream.relay.upstream")

JSON_TYPE = "application/json; charset=utf-8"
PING = b":\n\n"  # the SSE comment llama-server sends while it has nothing to say
WATCH_PERIOD = 0.05  # seconds between the watcher's cancel/ping passes
MAX_ERROR_BODY = 1024 * 1024  # an upstream error body we relay to the caller, at most

# Connection-scoped headers (RFC 9110 7.6.1) plus the proxy ones; never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def error_type_for(status: int) -> str:
    """llama-server's error ``type`` for an HTTP status."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def error_object(status: int, message: str, error_type: str | None = None) -> dict:
    return {"code": status, "message": message, "type": error_type or error_type_for(status)}


def error_event(error: dict) -> bytes:
    """The in-stream error llama-server writes: ``data: {"error": {...}}\\n\\n``."""
    return b"data: " + json.dumps({"error": error}, ensure_ascii=False).encode() + b"\n\n"


class UpstreamError(ShmstreamError):
    """The upstream could not be reached or broke the connection."""

    status = 502
    error_type = "server_error"
    default_message = "Upstream server error"


# --- cutting a call from another thread ---------------------------------------------------


class Abort:
    """A handle that cuts one upstream call from any thread, at any point of the call.

    The call's I/O thread reports each network stream it is about to use
    (:meth:`attach_stream`); :meth:`abort` shuts that stream's socket down and runs the
    callbacks (the demo upstream's wake-up). After :meth:`detach` (the call is over and its
    connection may go back to the pool, to another thread) aborting does nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aborted = False
        self._detached = False
        self._stream = None
        self._callbacks: list[Callable[[], None]] = []
        self.aborted_at = 0.0  # time.monotonic() of the abort

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> bool:
        """Cut the call. True if this call did it (not aborted or detached before)."""
        with self._lock:
            if self._aborted or self._detached:
                return False
            self._aborted = True
            self.aborted_at = time.monotonic()
            stream = self._stream
            callbacks = list(self._callbacks)
            # Shut the socket down while holding the lock, so a concurrent detach (and the
            # connection's return to the pool) waits for it.
            if stream is not None:
                _shutdown(stream)
        for callback in callbacks:
            callback()
        return True

    def on_abort(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on abort (at once if already aborted)."""
        with self._lock:
            if not self._aborted:
                self._callbacks.append(callback)
                return
        callback()

    def attach_stream(self, stream) -> None:
        """Called by the I/O thread before it reads or writes ``stream``. Raises
        ``httpcore.ReadError`` once aborted. No lock: under the GIL either this sees
        ``_aborted`` or :meth:`abort` sees the stream."""
        self._stream = stream
        if self._aborted:
            raise httpcore.ReadError("upstream call aborted")

    def detach(self) -> None:
        with self._lock:
            self._detached = True
            self._stream = None


def _shutdown(stream) -> None:
    sock = stream.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


_current = threading.local()  # .abort: the Abort of the call this thread is making


class _TrackedStream(httpcore.NetworkStream):
    """Reports itself to the calling thread's :class:`Abort` before each I/O."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def _attach(self) -> None:
        handle = getattr(_current, "abort", None)
        if handle is not None:
            handle.attach_stream(self._inner)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._attach()
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._attach()
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        self._attach()
        return _TrackedStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _TrackingBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _TrackedStream(stream)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _TrackedStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


# --- the interface ------------------------------------------------------------------------


@dataclass
class UpstreamRequest:
    method: str
    target: str  # path and query, as the client sent them (still percent-encoded)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes | Iterable[bytes] | None = None
    abort: Abort | None = None


class UpstreamResponse(abc.ABC):
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as received, latin-1 text, hop-by-hop included

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    @abc.abstractmethod
    def iter_bytes(self) -> Iterator[bytes]:
        """The body, content-decoded, in chunks as they arrive. Raises UpstreamError."""

    @abc.abstractmethod
    def iter_raw(self) -> Iterator[bytes]:
        """The body as sent (content-encoding kept). Raises UpstreamError."""

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the decoded body (the rest is dropped)."""
        parts, size = [], 0
        for chunk in self.iter_bytes():
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
        return b"".join(parts)[:limit]

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; idempotent."""


class Upstream(abc.ABC):
    """An OpenAI-compatible server. ``open`` is called from the thread that then reads the
    response and closes it."""

    description = "upstream"

    @abc.abstractmethod
    def open(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send the request, return once the status line and headers are in.

        Raises :class:`UpstreamError` when the upstream cannot be reached, times out, or the
        call was aborted (the request's ``abort``) before it answered.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release pooled connections."""


# --- HTTP ---------------------------------------------------------------------------------

DEFAULT_TIMEOUT = httpx.Timeout(
    connect=10.0,
    read=None,  # prompt processing and long generations are silent; pings and Abort cover it
    write=60.0,
    pool=30.0,
)
DEFAULT_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64,
                              keepalive_expiry=30.0)


class _HttpResponse(UpstreamResponse):
    def __init__(self, response: httpx.Response, abort: Abort | None):
        self._response = response
        self._abort = abort
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.headers = [(k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in response.headers.raw]
        self._closed = False

    def _iterate(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from chunks
        except httpx.HTTPError as exc:
            raise UpstreamError(_describe(exc, self._abort)) from exc

    def iter_bytes(self) -> Iterator[bytes]:
        encoding = self._response.headers.get("content-encoding", "identity").lower()
        if encoding in ("", "identity"):  # skip httpx's decoder chain: a hot path
            return self._iterate(self._response.iter_raw())
        return self._iterate(self._response.iter_bytes())

    def iter_raw(self) -> Iterator[bytes]:
        return self._iterate(self._response.iter_raw())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._abort is not None:
            self._abort.detach()  # before the connection can go back to the pool
        if getattr(_current, "abort", None) is self._abort:
            _current.abort = None
        with contextlib.suppress(httpx.HTTPError, OSError):
            self._response.close()


def _describe(exc: Exception, abort: Abort | None) -> str:
    if abort is not None and abort.aborted:
        return "upstream call aborted"
    kind = type(exc).__name__
    return f"upstream {kind}: {exc}" if str(exc) else f"upstream {kind}"


class HttpUpstream(Upstream):
    """An OpenAI-compatible server over HTTP(S), through one pooled httpx client per
    process (make it after fork)."""

    def __init__(self, base_url: str, timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                 limits: httpx.Limits = DEFAULT_LIMITS):
        self.base_url = base_url.rstrip("/")
        self.description = f"http upstream {self.base_url}"
        transport = httpx.HTTPTransport(limits=limits)
        # The only way to see the sockets a call uses (for Abort) is the network backend.
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_TrackingBackend(),
        )
        self._client = httpx.Client(transport=transport, timeout=timeout,
                                    follow_redirects=False)

    def open(self, request: UpstreamRequest) -> UpstreamResponse:
        _current.abort = request.abort
        try:
            built = self._client.build_request(
                request.method, self.base_url + request.target,
                headers=request.headers, content=request.body,
            )
            response = self._client.send(built, stream=True)
        except httpx.HTTPError as exc:
            _current.abort = None
            if request.abort is not None:
                request.abort.detach()
            raise UpstreamError(_describe(exc, request.abort)) from exc
        except BaseException:
            _current.abort = None
            if request.abort is not None:
                request.abort.detach()
            raise
        return _HttpResponse(response, request.abort)

    def close(self) -> None:
        self._client.close()


# --- headers ------------------------------------------------------------------------------

SESSION_HEADER = "x-conversation-id"  # the session's id; never forwarded upstream


def _connection_tokens(value: str | None) -> set[str]:
    return {token.strip().lower() for token in (value or "").split(",") if token.strip()}


def request_headers(environ: dict, upstream_api_key: str | None = None,
                    identity: bool = False, with_length: bool = True
                    ) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream for a WSGI request: hop-by-hop and ``Host`` dropped,
    ``Authorization`` replaced when ``upstream_api_key`` is set, ``X-Forwarded-For``
    extended. ``identity`` asks for an unencoded body; without ``with_length`` the
    caller's ``Content-Length`` is dropped (the body was re-framed)."""
    # Expect: the WSGI server already answered "100 Continue"; httpx would not wait for it.
    # X-Conversation-Id is shmstream's own: an upstream that keeps stream sessions too
    # (llama-server) would otherwise drain the answer to its end after a Stop closed our
    # connection, keeping its slot busy (PROTOCOL.md, producing rule 2).
    dropped = (HOP_BY_HOP | _connection_tokens(environ.get("HTTP_CONNECTION"))
               | {"host", "expect", SESSION_HEADER})
    if identity:
        dropped = dropped | {"accept-encoding"}
    if upstream_api_key:
        dropped = dropped | {"authorization"}
    out: list[tuple[bytes, bytes]] = []
    forwarded_for = None
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = key.replace("_", "-").lower()
        else:
            continue
        if name in dropped or not isinstance(value, str):
            continue
        if name == "content-length" and not with_length:
            continue
        if name == "x-forwarded-for":
            forwarded_for = value
            continue
        if name in ("content-type", "content-length") and value == "":
            continue
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    remote = environ.get("REMOTE_ADDR")
    if remote:
        chain = f"{forwarded_for}, {remote}" if forwarded_for else remote
        out.append((b"x-forwarded-for", chain.encode("latin-1")))
    elif forwarded_for:
        out.append((b"x-forwarded-for", forwarded_for.encode("latin-1")))
    if upstream_api_key:
        out.append((b"authorization", b"Bearer " + upstream_api_key.encode("latin-1")))
    if identity:
        out.append((b"accept-encoding", b"identity"))
    return out


def response_headers(headers: list[tuple[str, str]], reframed: bool = False
                     ) -> list[tuple[str, str]]:
    """Upstream response headers to pass on: hop-by-hop dropped; with ``reframed`` (the
    body is not the upstream's bytes) also Content-Length and Content-Encoding."""
    dropped = set(HOP_BY_HOP) | {"date", "server"}  # gunicorn writes its own
    for key, value in headers:
        if key.lower() == "connection":
            dropped |= _connection_tokens(value)
    if reframed:
        dropped |= {"content-length", "content-encoding"}
    return [(k, v) for k, v in headers if k.lower() not in dropped]


# --- producing ----------------------------------------------------------------------------


@dataclass
class Answer:
    """What the caller of a streamed completion gets once the upstream answered.

    ``body`` is None when the caller's response is the session (read from offset 0);
    otherwise it is the upstream's error answer (or ours), sent as is.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None = None


def _upstream_error(status: int, reason: str, body: bytes) -> dict:
    """The error object for the session: the upstream's own ``error`` object when its
    body has one, else one made from its status."""
    message = None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            return error
        for key in ("error", "message", "detail"):
            if isinstance(parsed.get(key), str):
                message = parsed[key]
                break
    elif body and len(body) <= 1024:
        text = body.decode("utf-8", "replace").strip()
        message = text or None
    return error_object(status, message or f"upstream returned {status} {reason}".strip())


def _at_boundary(tail: bytes) -> bool:
    """Whether bytes ending in ``tail`` end an SSE event (or are empty), so a ping can go
    in without splitting an event."""
    return (not tail or tail.endswith((b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n")))


class Producer:
    """Relays one streamed completion into ``session``, in its own thread.

    ``session`` belongs to the producer: it appends, finalizes and closes it. The watcher
    thread touches it only under ``_lock`` (to check for a cancel and to ping).
    """

    def __init__(self, session: Session, upstream: Upstream, request: UpstreamRequest,
                 ping_interval: float, watcher: ProducerWatcher):
        self.session = session
        self.upstream = upstream
        self.request = request
        self.abort = request.abort = request.abort or Abort()
        self.ping_interval = ping_interval
        self.watcher = watcher
        self.log_id = short_hash(session.conversation_id)
        self._lock = threading.Lock()
        self._open = True  # the session handle is usable (guarded by _lock)
        self._tail = b""
        self._last_append = time.monotonic()
        self._answer: Answer | None = None
        self._answered = threading.Event()
        self._bytes = 0
        self.started = time.monotonic()
        self.final_state: State | None = None
        self.finished = threading.Event()
        self._cancel_observed = False
        self._bytes_reported = 0  # of _bytes, to /metrics (guarded by _lock)

    # --- the caller's side ----------------------------------------------------------------
    def wait_answer(self, should_stop: Callable[[], bool] | None = None,
                    interval: float = 0.2) -> Answer | None:
        """Block until the upstream answered; None if ``should_stop()`` turned true first."""
        while not self._answered.wait(interval):
            if should_stop is not None and should_stop():
                return None
        return self._answer

    def _set_answer(self, answer: Answer) -> None:
        if not self._answered.is_set():
            self._answer = answer
            self._answered.set()

    # --- the producer thread --------------------------------------------------------------
    def start(self) -> None:
        self.watcher.register(self)
        thread = threading.Thread(target=self._run, name=f"producer-{self.log_id}",
                                  daemon=True)
        try:
            thread.start()
        except BaseException:
            self._finish(State.FAILED, None)
            raise

    def _append(self, data: bytes) -> bool:
        with self._lock:
            if not self._open:
                return False
            appended = self.session.append(data)
            self._last_append = time.monotonic()
            self._tail = (self._tail + data[-4:])[-4:]
        self._bytes += len(data)  # counted in /metrics by the watcher and at the end
        return appended

    def _append_error(self, error: dict) -> None:
        with self._lock:
            prefix = b"" if _at_boundary(self._tail) else b"\n\n"  # end a torn event first
        self._append(prefix + error_event(error))

    def _run(self) -> None:
        state = State.FAILED
        response: UpstreamResponse | None = None
        try:
            try:
                response = self.upstream.open(self.request)
            except UpstreamError as exc:
                if self.abort.aborted or self.session.producer_should_stop:
                    state = State.CANCELLED
                    self._set_answer(Answer(200, [("Content-Type", "text/event-stream")]))
                    return
                error = error_object(502, exc.message, "server_error")
                self._set_answer(Answer(502, [("Content-Type", JSON_TYPE)],
                                        json.dumps({"error": error}).encode()))
                self._append_error(error)
                metrics.upstream_error("unreachable")
                log.warning("session upstream-failed id=%s error=%r", self.log_id, exc.message)
                return
            log.info("session upstream-answered id=%s status=%d after=%.3fs", self.log_id,
                     response.status, time.monotonic() - self.started)
            if not 200 <= response.status < 300:
                metrics.upstream_error("status")
                body = response.read(MAX_ERROR_BODY)
                self._set_answer(Answer(response.status,
                                        response_headers(response.headers, reframed=True),
                                        body))
                self._append_error(_upstream_error(response.status, response.reason, body))
                return
            self._set_answer(Answer(response.status,
                                    response_headers(response.headers, reframed=True)))
            for chunk in response.iter_bytes():
                if not self._append(chunk):
                    break  # finalized by someone else (cancelled, replaced, shut down)
            state = State.DONE
        except UpstreamError as exc:
            if not (self.abort.aborted or self.session.producer_should_stop):
                self._append_error(error_object(502, exc.message, "server_error"))
                metrics.upstream_error("broken")
                log.warning("session upstream-broke id=%s error=%r", self.log_id, exc.message)
        except Exception:
            log.exception("session producer-crashed id=%s", self.log_id)
            self._append_error(error_object(500, "Internal server error", "server_error"))
        finally:
            self._finish(state, response)

    def _finish(self, state: State, response: UpstreamResponse | None) -> None:
        self.watcher.unregister(self)
        self.abort.detach()  # before the connection goes back to the pool
        if response is not None:
            response.close()
        with self._lock:
            self._open = False
            self._report_bytes()
            try:
                if self.session.producer_should_stop:
                    info = self.session.info()
                    state = info.state
                    self._observe_cancel(info)  # closed by the producer, not the watcher
                if self.session.finalize(state):
                    self.final_state = state
                else:
                    self.final_state = self.session.info().state
            except Exception:
                log.exception("session finalize-failed id=%s", self.log_id)
            finally:
                self.session.close()
        self._set_answer(Answer(200, [("Content-Type", "text/event-stream")]))
        log.info("session ended id=%s state=%s bytes=%d seconds=%.3f", self.log_id,
                 self.final_state.label if self.final_state else "?", self._bytes,
                 time.monotonic() - self.started)
        if self.final_state is not None:
            metrics.session_ended(self.final_state.label)
        self.finished.set()

    # --- the watcher's side ---------------------------------------------------------------
    def tick(self, now: float) -> None:
        """One watcher pass: abort if cancelled anywhere; ping if silent at a boundary."""
        if self.abort.aborted:
            return
        with self._lock:
            if not self._open:
                return
            self._report_bytes()
            stop = self.session.producer_should_stop
            if not stop and now - self._last_append >= self.ping_interval:
                if _at_boundary(self._tail):
                    self.session.append(PING)
                    self._tail = PING
                    metrics.bytes_appended(len(PING))
                self._last_append = now
        if stop and self.abort.abort():
            with self._lock:
                if self._open:
                    with contextlib.suppress(Exception):
                        self._observe_cancel(self.session.info())
            log.info("session cancel-observed id=%s upstream call aborted", self.log_id)

    def _report_bytes(self) -> None:
        """Add the bytes appended since the last call to /metrics (``_lock`` held): once
        per watcher pass instead of once per append keeps the hot path free of it."""
        appended = self._bytes
        if appended != self._bytes_reported:
            metrics.bytes_appended(appended - self._bytes_reported)
            self._bytes_reported = appended

    def _observe_cancel(self, info) -> None:
        """Once per producer: the time from its session's cancel (``completed_at``, set in
        whichever process cancelled) to now, when the upstream call is being closed."""
        if self._cancel_observed or info.state is not State.CANCELLED or not info.completed_at:
            return
        self._cancel_observed = True
        metrics.cancel_latency(time.time() - info.completed_at)

    def shutdown(self) -> None:
        """The process is going away: end the session as aborted and cut the call."""
        with self._lock:
            if self._open:
                with contextlib.suppress(Exception):
                    self.session.finalize(State.ABORTED)
        self.abort.abort()



class ProducerWatcher:
    """The per-process thread that makes cancellation land and keeps silent streams
    pinged. It runs only while this process has producers."""

    def __init__(self, period: float = WATCH_PERIOD):
        self.period = period
        self._lock = threading.Lock()
        self._producers: set[Producer] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False

    def register(self, producer: Producer) -> None:
        with self._lock:
            self._producers.add(producer)
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="producer-watcher",
                                                daemon=True)
                self._thread.start()
                atexit.register(self.shutdown)
        self._wake.set()

    def unregister(self, producer: Producer) -> None:
        with self._lock:
            self._producers.discard(producer)

    def producers(self) -> list[Producer]:
        with self._lock:
            return list(self._producers)

    def _run(self) -> None:
        while not self._closed:
            producers = self.producers()
            if not producers:
                self._wake.clear()
                if not self.producers():
                    self._wake.wait(1.0)
                continue
            now = time.monotonic()
            for producer in producers:
                try:
                    producer.tick(now)
                except Exception:
                    log.exception("watcher tick failed id=%s", producer.log_id)
            time.sleep(self.period)

    def shutdown(self) -> None:
        """Abort every local producer (the worker exits); their sessions end ``aborted``."""
        self._closed = True
        self._wake.set()
        for producer in self.producers():
            producer.shutdown()


class Relay:
    """Starts producers: the completion side of the HTTP layer."""

    def __init__(self, store: SessionStore, upstream: Upstream, ping_interval: float,
                 watcher: ProducerWatcher | None = None):
        self.store = store
        self.upstream = upstream
        self.ping_interval = ping_interval
        self.watcher = watcher or ProducerWatcher()

    def start(self, conversation_id: str, request: UpstreamRequest,
              metadata: dict | None = None) -> tuple[Producer, Session]:
        """Create (or replace) the session, start its producer, and return the producer and
        a reader handle on that very session (it ends if the session is replaced meanwhile).

        Raises what ``create_or_replace`` raises (InvalidConversationId, StoreUnavailable).
        """
        session = self.store.create_or_replace(conversation_id, metadata=metadata)
        try:
            reader = session.reopen()
        except BaseException:
            session.finalize(State.FAILED)
            session.close()
            raise
        producer = Producer(session, self.upstream, request, self.ping_interval, self.watcher)
        replaced = bool(getattr(session, "replaced", False))
        metrics.session_created(replaced)
        log.info("session started id=%s pid=%d route=%s replaced=%s", producer.log_id,
                 os.getpid(), request.target.split("?", 1)[0], "yes" if replaced else "no")
        try:
            producer.start()
        except BaseException:
            reader.close()
            raise
        return producer, reader
