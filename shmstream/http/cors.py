"""CORS, answered by shmstream itself (preflights are never proxied to the upstream).

- A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) gets 204
  with the methods and request headers the protocol uses: llama-server's own list lacks
  ``DELETE``, so a browser page on another origin could not press Stop.
- Every other answer to a request with an allowed ``Origin`` (ours, errors and proxied
  upstream answers alike) carries ``Access-Control-Allow-Origin``, replacing any the
  upstream sent, so a browser never sees two.

``cors_origins`` (``SHMSTREAM_CORS_ORIGINS``): ``*`` (the default, like llama-server), a
comma-separated list of exact origins (``https://chat.example.com``), or ``none``.
"""

from __future__ import annotations

import falcon

from shmstream.store.errors import ShmstreamError

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, X-Conversation-Id, X-Api-Key"
MAX_AGE = "600"  # seconds a browser may cache a preflight answer


class OriginNotAllowed(ShmstreamError):
    status = 403
    error_type = "permission_error"
    default_message = "Origin not allowed"


def parse_origins(value: str | None) -> frozenset[str] | None:
    """``None`` for any origin (``*``), else the set of allowed origins (maybe empty)."""
    value = (value or "*").strip()
    if value == "*":
        return None
    if value.lower() == "none":
        return frozenset()
    return frozenset(_normalise(part) for part in value.split(",") if part.strip())


def _normalise(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def is_preflight(req: falcon.Request) -> bool:
    return (req.method == "OPTIONS" and bool(req.get_header("Origin"))
            and bool(req.get_header("Access-Control-Request-Method")))


class Cors:
    """Falcon middleware; put it first, so preflights skip the API-key check and routing."""

    def __init__(self, origins: str | None = "*"):
        self.allowed = parse_origins(origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, or None."""
        if not origin:
            return None
        if self.allowed is None:
            return "*"
        return origin if _normalise(origin) in self.allowed else None

    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not is_preflight(req):
            return
        if self.allow_origin(req.get_header("Origin")) is None:
            raise OriginNotAllowed()
        resp.status = 204
        resp.set_header("Access-Control-Allow-Methods", ALLOW_METHODS)
        resp.set_header("Access-Control-Allow-Headers", ALLOW_HEADERS)
        resp.set_header("Access-Control-Max-Age", MAX_AGE)
        resp.complete = True  # no routing, no API key: a preflight never carries one

    async def process_response(self, req: falcon.Request, resp: falcon.Response, resource,
                               req_succeeded: bool) -> None:
        allowed = self.allow_origin(req.get_header("Origin"))
        if self.allowed is not None:
            resp.append_header("Vary", "Origin")
        if allowed is None:
            resp.delete_header("Access-Control-Allow-Origin")
            return
        resp.set_header("Access-Control-Allow-Origin", allowed)
