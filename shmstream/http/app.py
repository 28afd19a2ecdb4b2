"""The Falcon ASGI app: routes, the API-key check and the one place errors become bodies.

Every error body is ``{"error": {"code", "message", "type"}}`` (llama-server's shape), both
for :class:`~shmstream.store.errors.ShmstreamError` and for Falcon's own errors (404, 405, ...).
"""

from __future__ import annotations

import hmac
import json
import logging
import os

import falcon
import falcon.asgi

from shmstream.config import Settings
from shmstream.http.cors import Cors, is_preflight
from shmstream.http.health import HealthProbe, HealthResource
from shmstream.http.metrics import MetricsResource
from shmstream.http.parsing import STREAM_PREFIX, log_path
from shmstream.http.proxy import Proxy
from shmstream.http.resources import LookupResource, ProxyResource, StreamResource
from shmstream.http.streaming import with_client_link
from shmstream.http.webui import add_webui, favicon, is_webui_path
from shmstream.relay.client import AsyncUpstream
from shmstream.relay.handoff import RelayClient
from shmstream.relay.upstream import JSON_TYPE, error_object
from shmstream.store.errors import ShmstreamError, Unauthorized
from shmstream.store.interface import SessionStore

log = logging.getLogger("shmstream.http.app")

# Paths llama-server serves without an API key (plus its web UI: "/" and *.html). The
# model list stays public as there; /metrics is not (llama-server asks for the key too).
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/models", "/v1/models", "/api/tags"})


def error_body(status: int, message: str, error_type: str | None = None) -> bytes:
    return json.dumps({"error": error_object(status, message, error_type)}).encode()


async def handle_shmstream_error(req: falcon.Request, resp: falcon.Response,
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
    status = falcon.http_status_to_code(exc.status)
    message = exc.description or exc.title or "Error"
    resp.content_type = JSON_TYPE
    resp.data = error_body(status, message)


async def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception,
                            params: dict) -> None:
    """Anything else (Falcon picks the most specific handler, so HTTPError is not here)."""
    # ids never go to logs; /v1/streams/lookup is named as it is
    log.exception("unhandled error on %s %s", req.method, log_path(req.path))
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

    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.is_public(req):
            return
        given = req.get_header("X-Api-Key") or ""
        auth = req.get_header("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode("latin-1", "replace"), self._key):
            raise Unauthorized()


def create_app(store: SessionStore, settings: Settings, upstream: AsyncUpstream,
               relay: RelayClient):
    """Wire the routes; the ASGI callable to serve (a :class:`falcon.asgi.App` whose
    requests carry a client link, see :mod:`shmstream.http.streaming`). ``store`` and
    ``upstream`` are this process's (make them after fork); ``relay`` hands completions to
    the relay processes. The Falcon app itself is ``.falcon_app``."""
    middleware = [Cors(settings.cors_origins)]  # first: preflights need no key
    if settings.api_key:
        middleware.append(ApiKeyCheck(settings.api_key))
    app = falcon.asgi.App(middleware=middleware, media_type=JSON_TYPE)
    # Proxied answers keep exactly the upstream's headers: no default Content-Type.
    app.resp_options.default_media_type = None
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route("/v1/streams/lookup", LookupResource(store))
    health = HealthResource(HealthProbe(upstream, store, settings.backend,
                                        settings.upstream_api_key))
    app.add_route("/health", health)  # answered here, the upstream's health inside
    app.add_route("/v1/health", health)
    app.add_route("/metrics", MetricsResource(store))
    webui = add_webui(app)  # the chat page at /shmstream/ (routes win over the sinks below)
    # Sinks: later ones win. The stream sink takes the raw path (ids contain slashes).
    proxy = Proxy(upstream, settings.upstream_api_key)
    app.add_sink(ProxyResource(store, relay, proxy, settings.upstream_api_key,
                               icon=favicon(webui.files)), prefix=r"/")
    app.add_sink(StreamResource(store), prefix=rf"^{STREAM_PREFIX}(/|$)")
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(ShmstreamError, handle_shmstream_error)
    app.set_error_serializer(serialize_falcon_error)
    if "demo" in upstream.description:
        log.warning("pid %d: serving the %s", os.getpid(), upstream.description)
    else:
        log.info("pid %d: relaying to %s", os.getpid(), upstream.description)
    return with_client_link(app)
