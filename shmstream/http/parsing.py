"""Reading what PROTOCOL.md asks of a request from its ASGI scope: ids, offsets, the raw
path, the body (bounded), and the headers to forward upstream.

ASGI hands the request target as sent (``raw_path``, still percent-encoded, and the raw
``query_string``) and header values as bytes, so ids are decoded exactly once here.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote_to_bytes

import falcon

from shmstream.store.errors import (
    InvalidConversationId,
    InvalidOffset,
    InvalidRequest,
    MissingConversationId,
    PayloadTooLarge,
)

STREAM_PREFIX = "/v1/stream"
MAX_OFFSET = 2**63
MAX_CONVERSATION_ID_BYTES = 512  # UTF-8 bytes; the store itself takes up to 16 KiB
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
_DIGITS = re.compile(rb"[0-9]*")
SESSION_HEADER = "x-conversation-id"
# Connection-scoped headers (RFC 9110 7.6.1) plus the proxy ones; never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})


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


def raw_path(req: falcon.Request) -> tuple[bytes, bool]:
    """The request path as bytes, and whether it is still percent-encoded (``raw_path``
    of the scope; servers that omit it leave only the decoded ``path``)."""
    scope = req.scope
    path = scope.get("raw_path")
    if path:
        path = path.split(b"?", 1)[0].split(b"#", 1)[0]
        if b"://" in path[:16]:  # absolute-form request target
            after = path.split(b"://", 1)[1]
            path = b"/" + after.split(b"/", 1)[1] if b"/" in after else b"/"
        root = scope.get("root_path", "").encode("latin-1", "replace")
        if root and path.startswith(root):
            path = path[len(root):]
        return path, True
    return scope.get("path", "").encode("utf-8", "surrogateescape"), False


def query_params(req: falcon.Request) -> dict[str, bytes]:
    """The query's parameters (first value wins, like llama-server's), decoded to bytes."""
    params: dict[str, bytes] = {}
    query = req.scope.get("query_string", b"").decode("latin-1")
    # latin-1 both ways: every percent-decoded byte maps to one character and back.
    for key, value in parse_qsl(query, keep_blank_values=True, encoding="latin-1"):
        params.setdefault(key, value.encode("latin-1"))
    return params


def stream_conversation_id(req: falcon.Request) -> str:
    """The id of a ``/v1/stream/{id}`` or ``/v1/stream?conv_id=`` request."""
    path, encoded = raw_path(req)
    prefix = STREAM_PREFIX.encode() + b"/"
    if path.startswith(prefix):
        rest = path[len(prefix):]
        return utf8_id(unquote_to_bytes(rest) if encoded else rest)
    return utf8_id(query_params(req).get("conv_id", b""))


def parse_offset(req: falcon.Request) -> int:
    """``from``: ASCII digits below 2^63; empty or absent is 0. Raises InvalidOffset."""
    raw = query_params(req).get("from", b"")
    if not _DIGITS.fullmatch(raw):
        raise InvalidOffset()
    offset = int(raw) if raw else 0
    if offset >= MAX_OFFSET:
        raise InvalidOffset()
    return offset


def header_conversation_id(req: falcon.Request) -> str | None:
    """The ``X-Conversation-Id`` header as text; None when absent or empty."""
    value = req.get_header(SESSION_HEADER)
    if not value:
        return None
    return utf8_id(value.encode("latin-1"))  # Falcon decodes header bytes as latin-1


def target(req: falcon.Request) -> str:
    """Path and query as the client sent them, for the upstream's request line."""
    path, encoded = raw_path(req)
    if not encoded:  # a decoded path: encode it again for the request line
        path = quote(path, safe="/:@!$&'()*+,;=-._~").encode("ascii")
    query = req.scope.get("query_string", b"").decode("latin-1")
    text = path.decode("latin-1") or "/"
    return f"{text}?{query}" if query else text


def declared_length(req: falcon.Request) -> int | None:
    """The Content-Length, or None without one. Raises InvalidRequest for a bad value."""
    value = req.get_header("content-length")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise InvalidRequest("Invalid Content-Length")
    return int(value)


def has_body(req: falcon.Request) -> bool:
    """Whether the request carries a body: a Content-Length above 0, or a chunked one. A
    GET without either has none and must reach the upstream without one."""
    length = declared_length(req)
    if length is not None:
        return length > 0
    return "chunked" in (req.get_header("transfer-encoding") or "").lower()


async def read_body(req: falcon.Request, limit: int) -> bytes:
    """The whole request body (Content-Length or chunked), at most ``limit`` bytes.
    Raises PayloadTooLarge, or InvalidRequest for a bad Content-Length."""
    length = declared_length(req)
    if length is not None and length > limit:
        raise PayloadTooLarge()
    if not has_body(req):
        return b""
    parts, size = [], 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge()
        parts.append(chunk)
    return b"".join(parts)


def _connection_tokens(value: str | None) -> set[str]:
    return {token.strip().lower() for token in (value or "").split(",") if token.strip()}


def forward_headers(req: falcon.Request, upstream_api_key: str | None = None,
                    identity: bool = False, with_length: bool = True
                    ) -> list[tuple[str, str]]:
    """The client's headers for the upstream (latin-1 text pairs): hop-by-hop, ``Host``,
    ``Expect`` and ``X-Conversation-Id`` dropped (an upstream that keeps sessions of its
    own, like llama-server, would drain the answer after a Stop), ``Authorization``
    replaced by ``upstream_api_key`` when set, ``X-Forwarded-For`` extended with the
    client's address; with ``identity`` the upstream must not compress (its bytes go into
    the session); without ``with_length`` no Content-Length (the body is re-framed)."""
    raw = [(name.decode("latin-1").lower(), value.decode("latin-1"))
           for name, value in req.scope.get("headers", ())]
    connection = ",".join(value for name, value in raw if name == "connection")
    dropped = HOP_BY_HOP | _connection_tokens(connection) | {"host", "expect", SESSION_HEADER}
    if identity:
        dropped = dropped | {"accept-encoding"}
    if upstream_api_key:
        dropped = dropped | {"authorization"}
    if not with_length:
        dropped = dropped | {"content-length"}
    out, forwarded_for = [], None
    for name, value in raw:
        if name in dropped:
            continue
        if name == "x-forwarded-for":
            forwarded_for = value
            continue
        out.append((name, value))
    client = req.scope.get("client")
    remote = client[0] if client else None
    if remote:
        chain = f"{forwarded_for}, {remote}" if forwarded_for else remote
        out.append(("x-forwarded-for", chain))
    elif forwarded_for:
        out.append(("x-forwarded-for", forwarded_for))
    if upstream_api_key:
        out.append(("authorization", f"Bearer {upstream_api_key}"))
    if identity:
        out.append(("accept-encoding", "identity"))
    return out


def response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream response headers to pass on: hop-by-hop (and what ``Connection`` names),
    ``Date`` and ``Server`` (the server writes its own) dropped."""
    dropped = set(HOP_BY_HOP) | {"date", "server"}
    for key, value in headers:
        if key.lower() == "connection":
            dropped |= _connection_tokens(value)
    return [(k, v) for k, v in headers if k.lower() not in dropped]


def log_path(path: str) -> str:
    """A path fit for a log line: a ``/v1/stream/<id>`` path without its id (ids are
    capabilities); every other path (``/v1/streams/lookup`` too) as it is."""
    if path == STREAM_PREFIX or path.startswith(STREAM_PREFIX + "/"):
        return STREAM_PREFIX + "/..."
    return path
