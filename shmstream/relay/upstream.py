"""What every part that talks to an upstream shares: llama-server's error objects and
in-stream error events, the relay's constants, and the response-header filter.

The upstream client itself is :mod:`shmstream.relay.client` (httpx.AsyncClient); the pump of
one stream into its session is :mod:`shmstream.relay.producer`. (The threaded producers
that ran inside the HTTP workers are gone: relays run in processes of their own.)
"""

from __future__ import annotations

import json

import httpx

from shmstream.store.errors import ShmstreamError

JSON_TYPE = "application/json; charset=utf-8"
PING = b":\n\n"  # the SSE comment llama-server sends while it has nothing to say
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

    @classmethod
    def caused_by(cls, exc: BaseException) -> UpstreamError:
        """The error for a client library's exception: ``upstream <kind>: <message>``."""
        kind = type(exc).__name__
        return cls(f"upstream {kind}: {exc}" if str(exc) else f"upstream {kind}")


DEFAULT_TIMEOUT = httpx.Timeout(
    connect=10.0,
    read=None,  # prompt processing and long generations are silent; pings and cancels cover it
    write=60.0,
    pool=30.0,
)


def _connection_tokens(value: str | None) -> set[str]:
    return {token.strip().lower() for token in (value or "").split(",") if token.strip()}


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
