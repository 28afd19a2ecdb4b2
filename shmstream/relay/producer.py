"""One streamed completion pumped from the upstream into its session, as an asyncio task.

The pump and the relay's ticker (:meth:`Producer.tick`, every ~50 ms) run on the same event
loop, so a step of one never interleaves with a step of the other: what the ticker decides
(ping, cancel) it decides on state the pump set in the same synchronous step as its append.

Pings (issue 16): ``:\\n\\n`` goes in only while the upstream response is open and has been
silent for ``ping_interval``, at an event boundary, and never once the upstream's terminal
event was appended. The pump marks the stream ``ended`` in the very step that appends a
terminal event (``data: [DONE]``, /v1/messages' ``message_stop``, /v1/responses'
``response.completed``/``failed``/``incomplete``) and when the body ends, before it awaits
anything (closing the response, finalizing); so however late the pump runs again, no
ping lands after the upstream's last byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable

from shmstream import metrics
from shmstream.relay.bells import BellRinger
from shmstream.relay.client import AsyncUpstream, AsyncUpstreamRequest, AsyncUpstreamResponse
from shmstream.relay.handoff import RelayAnswer
from shmstream.relay.upstream import (
    JSON_TYPE,
    MAX_ERROR_BODY,
    PING,
    UpstreamError,
    error_event,
    error_object,
    response_headers,
)
from shmstream.store.errors import StoreUnavailable
from shmstream.store.ids import short_hash
from shmstream.store.interface import Session
from shmstream.store.states import State

log = logging.getLogger("shmstream.relay.producer")

SSE_ANSWER = RelayAnswer(200, [("Content-Type", "text/event-stream")], None)

# The last event of an answer, per API: OpenAI-style "[DONE]", Anthropic's message_stop,
# the Responses API's final response events.
_TERMINAL = re.compile(
    rb"(?:^|\n)data: ?\[DONE\][ \t]*\r?\n"
    rb"|(?:^|\n)event: ?(?:message_stop|response\.completed|response\.failed"
    rb"|response\.incomplete)[ \t]*\r?\n"
)
_TAIL = 64  # bytes of the previous chunk kept to find a terminal event split across chunks


def _at_boundary(tail: bytes) -> bool:
    """Whether bytes ending in ``tail`` end an SSE event (or are empty), so a ping can go
    in without splitting an event."""
    return not tail or tail.endswith((b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n"))


def _ring(transport: asyncio.Transport) -> None:
    with contextlib.suppress(Exception):  # a reader that hung up: nothing to ring
        transport.write(b"!")


def upstream_error(status: int, reason: str, body: bytes) -> dict:
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


class Producer:
    """Relays one completion into ``session``; owns the session handle (appends,
    finalizes, closes it). ``on_answer`` is called once with the caller's answer."""

    def __init__(self, session: Session, upstream: AsyncUpstream,
                 request: AsyncUpstreamRequest, ping_interval: float,
                 on_answer: Callable[[RelayAnswer], None] | None = None):
        self.session = session
        self.upstream = upstream
        self.request = request
        self.ping_interval = ping_interval
        self.log_id = short_hash(session.conversation_id)
        self.started = time.monotonic()
        self._answered: tuple[int, float] | None = None  # upstream status, seconds to it
        self._appends = self._appends_seen = 0  # appends made / as of the last tick
        self.answer: RelayAnswer | None = None
        self.final_state: State | None = None
        self.task: asyncio.Task | None = None
        self.ended = False  # the upstream's last byte is in: no ping from now on
        self._store_lost = False  # "store-lost" was logged for this session (once)
        self.open = True  # the session handle is usable
        self.stop_reason: str | None = None  # why the task was cancelled from outside
        self._on_answer = on_answer
        self._tail = b""
        self._last_append = time.monotonic()
        self._bytes = 0
        self._bytes_reported = 0
        # readers rung on every change: their hand-off connection, and its bell (or None)
        self._doorbells: dict[asyncio.Transport, tuple[BellRinger, bytes, int] | None] = {}

    # --- the pump ---------------------------------------------------------------------
    def start(self) -> asyncio.Task:
        self.task = asyncio.get_running_loop().create_task(
            self.run(), name=f"producer-{self.log_id}")
        self.task.add_done_callback(self._done)
        return self.task

    def _done(self, task: asyncio.Task) -> None:
        # A task cancelled before its first step never ran ``run``'s finally.
        if self.open:
            self.open = False
            try:
                self.session.finalize(State.ABORTED)
            finally:
                self.session.close()
                self._ring_doorbells_for_the_end()
            self._set_answer(SSE_ANSWER)

    def _set_answer(self, answer: RelayAnswer) -> None:
        if self.answer is None:
            self.answer = answer
            if self._on_answer is not None:
                self._on_answer(answer)

    def append(self, data: bytes) -> bool:
        """Append upstream bytes; marks the stream ``ended`` in the same step when they
        hold a terminal event. False once the session was finalized by someone else."""
        if not self.open:
            return False
        appended = self.session.append(data)
        if appended:
            self._ring_doorbells()
        self._appends += 1
        self._last_append = time.monotonic()
        window = self._tail + data
        # A plain search first: the regex runs only on the rare chunk that may end it.
        if (b"[DONE]" in window or b"message_stop" in window or b"response." in window) \
                and _TERMINAL.search(window):
            self.ended = True
        self._tail = window[-_TAIL:]
        self._bytes += len(data)
        return appended

    def _body_ended(self) -> None:
        self.ended = True  # in the body's last step: no ping after the upstream's last byte

    def _append_error(self, error: dict) -> None:
        prefix = b"" if _at_boundary(self._tail) else b"\n\n"  # end a torn event first
        self.append(prefix + error_event(error))
        self.ended = True

    def _lost_store(self, exc: StoreUnavailable) -> None:
        if not self._store_lost:
            self._store_lost = True
            log.warning("session store-lost id=%s error=%r", self.log_id, exc.message)

    def _stopped(self) -> bool:
        return self.stop_reason is not None or self.session.producer_should_stop

    async def run(self) -> State:
        state = State.FAILED
        response: AsyncUpstreamResponse | None = None
        try:
            try:
                response = await self.upstream.open(self.request)
            except UpstreamError as exc:
                error = error_object(502, exc.message, "server_error")
                metrics.upstream_error("unreachable")  # counted before the caller hears
                self._set_answer(RelayAnswer(502, [("Content-Type", JSON_TYPE)],
                                             json.dumps({"error": error}).encode()))
                self._append_error(error)
                log.warning("session upstream-failed id=%s error=%r", self.log_id, exc.message)
                return state
            self._answered = (response.status, time.monotonic() - self.started)
            # Its status and time are in the "ended" line: one INFO line fewer per session
            # (logging was ~9% of a relay's CPU per stream setup).
            log.debug("session upstream-answered id=%s status=%d after=%.3fs", self.log_id,
                      *self._answered)
            if not 200 <= response.status < 300:
                metrics.upstream_error("status")
                body = await response.read(MAX_ERROR_BODY)
                self._set_answer(RelayAnswer(response.status,
                                             response_headers(response.headers, reframed=True),
                                             body))
                self._append_error(upstream_error(response.status, response.reason, body))
                return state
            self._set_answer(RelayAnswer(response.status,
                                         response_headers(response.headers, reframed=True),
                                         None))
            # Each chunk goes into the session as it arrives; append's False (finalized by
            # someone else: cancelled, replaced, shut down) stops the pump.
            await response.pump(self.append, self._body_ended)
            self.ended = True
            state = State.DONE
        except UpstreamError as exc:
            if not self._stopped():
                self._append_error(error_object(502, exc.message, "server_error"))
                metrics.upstream_error("broken")
                log.warning("session upstream-broke id=%s error=%r", self.log_id, exc.message)
        except asyncio.CancelledError:
            state = State.CANCELLED if self.stop_reason != "abort" else State.ABORTED
            # Finish below, then let the cancellation through.
            raise
        except StoreUnavailable as exc:
            # The store went away under a running answer; the outage itself is logged once
            # per process by the store: say which session it cost, with no traceback.
            self._lost_store(exc)
        except Exception:
            log.exception("session producer-crashed id=%s", self.log_id)
            self._append_error(error_object(500, "Internal server error", "server_error"))
        finally:
            self.ended = True
            await self._finish(state, response)
        return self.final_state or state

    async def _finish(self, state: State, response: AsyncUpstreamResponse | None) -> None:
        if response is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(response.aclose())
        self.open = False
        self.report_bytes()
        try:
            if self.session.producer_should_stop:
                info = self.session.info()
                self._observe_cancel(info)
            if self.session.finalize(state):
                self.final_state = state
            else:
                self.final_state = self.session.info().state
        except StoreUnavailable as exc:
            self._lost_store(exc)
        except Exception:
            log.exception("session finalize-failed id=%s", self.log_id)
        finally:
            self.session.close()
            self._ring_doorbells_for_the_end()
        self._set_answer(SSE_ANSWER)  # cancelled or aborted before the upstream answered
        status, answered = self._answered or ("-", None)
        log.info("session ended id=%s state=%s upstream=%s answered=%s bytes=%d seconds=%.3f",
                 self.log_id, self.final_state.label if self.final_state else "?", status,
                 "-" if answered is None else f"{answered:.3f}s", self._bytes,
                 time.monotonic() - self.started)
        if self.final_state is not None:
            metrics.session_ended(self.final_state.label)

    # --- the readers' doorbells (the worker side is relay/handoff.py's RelayDoorbell) -------
    def add_doorbell(self, transport: asyncio.Transport,
                     bell: tuple[BellRinger, bytes, int] | None = None) -> bool:
        """Ring the reader behind ``transport`` (its hand-off connection) after every
        append from now on: through ``bell`` (the relay's ringer, the worker's bell box
        address, the stream's number there), else with one byte on the connection; at
        the end, close it (after a last byte). False if the session ended already
        (closed at once)."""
        if not self.open:
            if bell is None:
                _ring(transport)
            transport.close()
            return False
        self._doorbells[transport] = bell
        return True

    def remove_doorbell(self, transport: asyncio.Transport) -> None:
        self._doorbells.pop(transport, None)

    def _ring_doorbells(self) -> None:
        for transport, bell in self._doorbells.items():
            if bell is not None:
                bell[0].ring(bell[1], bell[2])  # coalesced per worker per loop pass
            # A reader's unread rings still in the socket buffer already say "look again"
            # (all it does is poll the session): one byte more per append would only pile up.
            elif not transport.get_write_buffer_size():
                _ring(transport)

    def _ring_doorbells_for_the_end(self) -> None:
        doorbells, self._doorbells = self._doorbells, {}
        for transport, bell in doorbells.items():
            if bell is None:
                _ring(transport)
            with contextlib.suppress(Exception):
                transport.close()  # the reader polls once more, finds the end, stops

    # --- the ticker's side --------------------------------------------------------------
    def tick(self, now: float) -> int:
        """One ticker pass: cut the call if the session was cancelled anywhere; ping if
        the upstream is open and silent, at an event boundary. Returns the bytes appended
        since the last pass, for /metrics (the ticker adds them up over every producer
        and counts them once: a multiprocess metric write costs microseconds)."""
        if self.open and self.stop_reason is None:
            # A producer that appended since the last pass needs no peek: an append to a
            # finalized session fails, and that ends it; one gone silent is peeked at the
            # next pass (a cancel lands within two passes). At 10 events/s per stream
            # this saves half the peeks, which py-spy put at ~4% of a relay's CPU.
            appended, self._appends_seen = self._appends != self._appends_seen, self._appends
            if not appended and self.session.producer_should_stop:
                self.stop("cancel")
                log.info("session cancel-observed id=%s upstream call closed", self.log_id)
            elif not self.ended and now - self._last_append >= self.ping_interval:
                if _at_boundary(self._tail):
                    if self.session.append(PING):
                        self._ring_doorbells()
                    self._tail = PING
                    self._bytes += len(PING)
                self._last_append = now
        return self.unreported_bytes()

    def stop(self, reason: str) -> None:
        """Cut the upstream call: ``"cancel"`` (the session was cancelled or replaced) or
        ``"abort"`` (the relay shuts down: the session ends ``aborted``)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if reason == "abort" and self.open:
            try:
                self.session.finalize(State.ABORTED)
            except Exception:
                log.exception("session abort-failed id=%s", self.log_id)
        if self.task is not None:
            self.task.cancel()

    def unreported_bytes(self) -> int:
        """The bytes appended since the last call (or tick), for /metrics."""
        delta = self._bytes - self._bytes_reported
        self._bytes_reported = self._bytes
        return delta

    def report_bytes(self) -> None:
        delta = self.unreported_bytes()
        if delta:
            metrics.bytes_appended(delta)

    def _observe_cancel(self, info) -> None:
        if info.state is State.CANCELLED and info.completed_at:
            metrics.cancel_latency(time.time() - info.completed_at)
