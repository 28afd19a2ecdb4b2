"""The chat page at ``/shmstream/``: a few static files (``shmstream/http/static``), no build step,
and ``/favicon.ico`` when the upstream has none.

The page talks to the same origin's ``/v1/...`` routes, so it shows resume, lookup and Stop
working against whatever upstream shmstream relays. It lives under its own prefix so it
never shadows the upstream's web UI at ``/``. The files are read once, when the app is
built; they hold no secrets, so the API-key check lets anyone load them (the page asks for
the key and sends it with its API calls).
"""

from __future__ import annotations

import hashlib
from importlib import resources

import falcon

WEBUI_PREFIX = "/shmstream/"
INDEX = "index.html"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The page needs nothing from other origins and runs no inline code.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")


def is_webui_path(path: str) -> bool:
    """True for the page's paths (``/shmstream`` and everything under ``/shmstream/``)."""
    return path == WEBUI_PREFIX.rstrip("/") or path.startswith(WEBUI_PREFIX)


def _suffix(name: str) -> str:
    return name[name.rfind("."):] if "." in name else ""


class StaticFile:
    def __init__(self, name: str, data: bytes):
        self.data = data
        self.content_type = CONTENT_TYPES[_suffix(name)]
        self.etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'


VENDOR = "vendor"  # third-party libraries, copied unchanged (static/vendor/README.md)


def load_static() -> dict[str, StaticFile]:
    """The packaged files the page may serve, by name: ``static/*`` and ``vendor/<name>``
    for ``static/vendor/*`` (no other subdirectory is served)."""
    folder = resources.files("shmstream.http") / "static"
    files = {}
    for prefix, directory in (("", folder), (VENDOR + "/", folder / VENDOR)):
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if entry.is_file() and _suffix(entry.name) in CONTENT_TYPES:
                files[prefix + entry.name] = StaticFile(entry.name, entry.read_bytes())
    return files


class WebUIResource:
    """``GET``/``HEAD`` ``/shmstream/`` (the page) and ``/shmstream/{name}`` (its files);
    ``/shmstream`` redirects to ``/shmstream/`` so the page's relative URLs resolve."""

    def __init__(self, files: dict[str, StaticFile] | None = None):
        self.files = load_static() if files is None else files

    async def on_get(self, req: falcon.Request, resp: falcon.Response, name: str = INDEX,
                     vendored: str | None = None) -> None:
        if vendored is not None:
            name = f"{VENDOR}/{vendored}"
        if req.path == WEBUI_PREFIX.rstrip("/"):
            query = f"?{req.query_string}" if req.query_string else ""
            resp.status = falcon.HTTP_308
            resp.location = WEBUI_PREFIX + query
            resp.content_type = "text/plain; charset=utf-8"
            resp.data = b""
            return
        static = self.files.get(name)
        if static is None:
            raise falcon.HTTPNotFound(description="File Not Found")
        resp.etag = static.etag
        resp.cache_control = ["no-cache"]  # always revalidate: a new release shows at once
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "no-referrer")
        if static.etag in (req.get_header("If-None-Match") or ""):
            resp.status = falcon.HTTP_304
            return
        resp.content_type = static.content_type
        if static.content_type.startswith("text/html"):
            resp.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        resp.data = static.data

    on_head = on_get


FAVICON = "favicon.svg"


def favicon(files: dict[str, StaticFile]) -> StaticFile:
    """Our icon: browsers ask every origin for ``/favicon.ico``; answered by the proxy
    with this one when the upstream has none (so a page load logs no 404)."""
    return files[FAVICON]


def add_webui(app: falcon.App) -> WebUIResource:
    """Route the page. Routes are matched before sinks, so these win over the proxy."""
    resource = WebUIResource()
    app.add_route(WEBUI_PREFIX.rstrip("/"), resource)
    app.add_route(WEBUI_PREFIX, resource)
    app.add_route(WEBUI_PREFIX + "{name}", resource)
    app.add_route(WEBUI_PREFIX + VENDOR + "/{vendored}", resource)
    return resource
