"""The chat page's routes in-process: served from package data, ahead of the proxy sink,
loadable without the API key (the API calls still need it)."""

from __future__ import annotations

import falcon.testing
import pytest

from shmstream.config import Settings
from shmstream.http.app import create_app
from shmstream.http.webui import WEBUI_PREFIX, load_static
from shmstream.relay.demo import AsyncDemoUpstream
from shmstream.relay.handoff import RelayClient
from shmstream.shm.store import ShmStore


@pytest.fixture
def make_client(namespace, tmp_path):
    def make(**settings_options) -> falcon.testing.TestClient:
        settings = Settings(namespace=namespace, **settings_options)
        store = ShmStore(namespace)
        # The page's routes never hand a completion over: no relay listens there.
        relay = RelayClient(str(tmp_path / "no-relay.sock"))
        return falcon.testing.TestClient(create_app(store, settings, AsyncDemoUpstream(1000),
                                                    relay))

    return make


def test_the_packaged_files_are_there():
    assert {"index.html", "chat.js", "chat.css"} <= set(load_static())


@pytest.mark.parametrize(("path", "content_type", "marker"), [
    ("/shmstream/", "text/html; charset=utf-8", b'<script src="chat.js"'),
    ("/shmstream/index.html", "text/html; charset=utf-8", b"<title>shmstream chat</title>"),
    ("/shmstream/chat.js", "text/javascript; charset=utf-8", b"X-Conversation-Id"),
    ("/shmstream/chat.css", "text/css; charset=utf-8", b".answer"),
])
def test_page_files_win_over_the_proxy(make_client, path, content_type, marker):
    result = make_client().simulate_get(path)
    assert result.status_code == 200
    assert result.headers["content-type"] == content_type
    assert marker in result.content
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-content-type-options"] == "nosniff"


def test_the_page_runs_no_inline_code(make_client):
    result = make_client().simulate_get("/shmstream/")
    assert "script-src" not in result.headers["content-security-policy"]  # default 'self'
    assert "default-src 'self'" in result.headers["content-security-policy"]


def test_without_the_slash_redirects_so_relative_urls_resolve(make_client):
    result = make_client().simulate_get("/shmstream", query_string="x=1")
    assert result.status_code == 308
    assert result.headers["location"] == "/shmstream/?x=1"


def test_unknown_files_are_404_not_proxied(make_client):
    for path in ("/shmstream/nope.js", "/shmstream/../pyproject.toml", "/shmstream/sub/x.js"):
        result = make_client().simulate_get(path)
        assert result.status_code == 404, path
        assert result.json["error"]["code"] == 404


def test_etag_revalidation(make_client):
    client = make_client()
    first = client.simulate_get("/shmstream/chat.js")
    again = client.simulate_get("/shmstream/chat.js",
                                headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_head(make_client):
    result = make_client().simulate_head("/shmstream/")
    assert result.status_code == 200 and result.content == b""


def test_the_page_loads_without_the_api_key_but_the_api_needs_it(make_client):
    client = make_client(api_key="sekret")
    for path in ("/shmstream", WEBUI_PREFIX, "/shmstream/chat.js", "/shmstream/chat.css"):
        assert client.simulate_get(path).status_code in (200, 308), path
    lookup = {"conversation_ids": ["x"]}
    assert client.simulate_post("/v1/streams/lookup", json=lookup).status_code == 401
    assert client.simulate_post("/shmstream/", json=lookup).status_code == 401
    authorized = client.simulate_post("/v1/streams/lookup", json=lookup,
                                      headers={"Authorization": "Bearer sekret"})
    assert authorized.status_code == 200 and authorized.json == []


def test_other_methods_are_405(make_client):
    assert make_client().simulate_post("/shmstream/").status_code == 405


def test_the_vendored_libraries_are_served_with_their_licenses_packaged(make_client):
    from importlib import resources

    client = make_client()
    for name, marker in (("marked.umd.js", b"marked v18"), ("purify.min.js", b"DOMPurify 3")):
        result = client.simulate_get(f"/shmstream/vendor/{name}")
        assert result.status_code == 200, name
        assert result.headers["content-type"] == "text/javascript; charset=utf-8"
        assert marker in result.content
    vendor = resources.files("shmstream.http") / "static" / "vendor"
    for license_file in ("marked.LICENSE.md", "dompurify.LICENSE"):
        assert (vendor / license_file).read_text().strip(), license_file
    # Only the page's own files and the vendored scripts are served, nothing else there.
    assert client.simulate_get("/shmstream/vendor/README.md").status_code == 404
    assert client.simulate_get("/shmstream/vendor/../chat.js").status_code == 404
