"""The Falcon WSGI app: routes, the API-key check and the one place errors become bodies.

Every error body is ``{"error": {"code", "message", "type"}}`` (llama-server's shape), both
for :class:`~shmstream.store.errors.ShmstreamError` and for Falcon's own errors (404, 405, ...).
"""

from __future__ import annotations

import hmac
import json
import logging
import os

import falcon

from shmstream.config import Settings
from shmstream.http.cors import Cors, is_preflight
from shmstream.http.health import HealthProbe, HealthResource
from shmstream.http.resources import (
    STREAM_PREFIX,
    LookupResource,
    ProxyResource,
    StreamResource,
)
from shmstream.http.webui import add_webui, is_webui_path
from shmstream.metrics import MetricsResource
from shmstream.relay.upstream import JSON_TYPE, HttpUpstream, Relay, Upstream, error_object
from shmstream.store.errors import ShmstreamError, Unauthorized
from shmstream.store.interface import SessionStore

log = logging.getLogger("shmstream.http.app")

# Paths llama-server serves without an API key (plus its web UI: "/" and *.html). The
# model list stays public as there; /metrics is not (llama-server asks for the key too).
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/models", "/v1/models", "/api/tags"})


def error_body(status: int, message: str, error_type: str | None = None) -> bytes:
    return json.dumps({"error": error_object(status, message, error_type)}).encode()


def _status_code(status) -> int:
    return status if isinstance(status, int) else int(str(status).split(" ", 1)[0])


def handle_shmstream_error(req: falcon.Request, resp: falcon.Response,
                           exc: ShmstreamError, params: dict) -> None:
    """The one mapping from our exceptions to HTTP answers."""
    resp.status = exc.status
    resp.content_type = JSON_TYPE
    resp.data = error_body(exc.status, exc.message, exc.error_type)
    if exc.status == 401:
        resp.set_header("WWW-Authenticate", "Bearer")


def serialize_falcon_error(req: falcon.Request, resp: falcon.Response,
                           exc: falcon.HTTPError) -> None:
    """Falcon's own errors (unknown route, wrong method, bad request, crashes) in the same
    shape. Headers Falcon set (e.g. ``Allow`` on 405) stay."""
    status = _status_code(exc.status)
    message = exc.description or exc.title or "Error"
    resp.content_type = JSON_TYPE
    resp.data = error_body(status, message)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception,
                      params: dict) -> None:
    """Anything else (Falcon picks the most specific handler, so HTTPError is not here)."""
    path = STREAM_PREFIX + "/..." if req.path.startswith(STREAM_PREFIX) else req.path
    log.exception("unhandled error on %s %s", req.method, path)  # ids never go to logs
    resp.status = 500
    resp.content_type = JSON_TYPE
    resp.data = error_body(500, "Internal server error", "server_error")


class ApiKeyCheck:
    """llama-server's ``--api-key``: ``Authorization: Bearer <key>`` or ``X-Api-Key``,
    except for the health and model list paths, the web UI pages and CORS preflights
    (which :class:`~shmstream.http.cors.Cors` answers before this check runs)."""

    def __init__(self, api_key: str):
        self._key = api_key.encode()

    @staticmethod
    def is_public(req: falcon.Request) -> bool:
        if is_preflight(req) or req.path in PUBLIC_PATHS:
            return True
        return req.method in ("GET", "HEAD") and (req.path == "/" or req.path.endswith(".html")
                                                  or is_webui_path(req.path))

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.is_public(req):
            return
        given = req.get_header("X-Api-Key") or ""
        auth = req.get_header("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode("latin-1", "replace"), self._key):
            raise Unauthorized()


def make_upstream(settings: Settings) -> Upstream:
    """The configured upstream: HTTP to ``settings.upstream``, else the built-in demo."""
    if settings.upstream:
        return HttpUpstream(settings.upstream)
    from shmstream.relay.demo import DemoUpstream

    return DemoUpstream(settings.demo_tokens_per_second)


def create_app(store: SessionStore, settings: Settings, upstream: Upstream,
               relay: Relay | None = None) -> falcon.App:
    """Wire the routes. ``store`` and ``upstream`` are this process's (make them after
    fork); ``relay`` defaults to one with its own producer watcher."""
    relay = relay or Relay(store, upstream, settings.ping_interval)
    middleware = [Cors(settings.cors_origins)]  # first: preflights need no key
    if settings.api_key:
        middleware.append(ApiKeyCheck(settings.api_key))
    app = falcon.App(middleware=middleware, media_type=JSON_TYPE)
    # Proxied answers keep exactly the upstream's headers: no default Content-Type.
    app.resp_options.default_media_type = None
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route("/v1/streams/lookup", LookupResource(store))
    health = HealthResource(HealthProbe(upstream, store, settings.backend,
                                        settings.upstream_api_key))
    app.add_route("/health", health)  # answered here, the upstream's health inside
    app.add_route("/v1/health", health)
    app.add_route("/metrics", MetricsResource(store))
    add_webui(app)  # the chat page at /shmstream/ (routes win over the sinks below)
    # Sinks: later ones win. The stream sink takes the raw URI (ids contain slashes).
    app.add_sink(ProxyResource(relay, upstream, settings.upstream_api_key), prefix=r"/")
    app.add_sink(StreamResource(store), prefix=rf"^{STREAM_PREFIX}(/|$)")
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(ShmstreamError, handle_shmstream_error)
    app.set_error_serializer(serialize_falcon_error)
    if upstream.__class__.__name__ == "DemoUpstream":
        log.warning("pid %d: serving the %s", os.getpid(), upstream.description)
    else:
        log.info("pid %d: relaying to %s", os.getpid(), upstream.description)
    return app
