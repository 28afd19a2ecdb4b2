"""gunicorn's access log without conversation ids: ids are capabilities.

``GET /v1/stream/<id>`` and ``?conv_id=<id>`` put ids in request lines, so the packaged
gunicorn configuration uses :class:`RedactingLogger`: in the ``%(r)s``, ``%(U)s`` and
``%(q)s`` atoms the id becomes ``~<short hash>`` (the same hash shmstream's own log lines
use), and the ``X-Conversation-Id``, ``Authorization`` and ``X-Api-Key`` request-header
atoms are dropped.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode

from gunicorn.glogging import Logger

from shmstream.store.ids import short_hash

STREAM_PATH = "/v1/stream/"
SECRET_HEADERS = ("{x-conversation-id}i", "{authorization}i", "{x-api-key}i")


def _tag(raw: bytes) -> str:
    try:
        return "~" + short_hash(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "~invalid"


def redact_path(path: str, encoded: bool) -> str:
    """``/v1/stream/<id>`` with the id replaced by its tag; other paths unchanged."""
    if not path.startswith(STREAM_PATH) or len(path) == len(STREAM_PATH):
        return path
    raw = path[len(STREAM_PATH):].encode("latin-1", "replace")
    return STREAM_PATH + _tag(unquote_to_bytes(raw) if encoded else raw)


def redact_query(query: str) -> str:
    if "conv_id" not in query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True, encoding="latin-1")
    return urlencode([(key, _tag(value.encode("latin-1")) if key == "conv_id" else value)
                      for key, value in pairs], quote_via=quote, safe="~")


def redact_target(target: str) -> str:
    path, mark, query = target.partition("?")
    return redact_path(path, encoded=True) + (mark + redact_query(query) if mark else "")


class RedactingLogger(Logger):
    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["U"] = redact_path(atoms.get("U") or "", encoded=False)
        atoms["q"] = redact_query(atoms.get("q") or "")
        method = environ.get("REQUEST_METHOD")
        atoms["r"] = (f"{method} {redact_target(environ.get('RAW_URI') or '')} "
                      f"{environ.get('SERVER_PROTOCOL')}")
        for name in SECRET_HEADERS:
            atoms.pop(name, None)
        return atoms
