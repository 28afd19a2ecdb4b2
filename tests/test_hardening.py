"""Security limits and observability in-process: conversation-id limits, lookup limits, CORS,
the API key's public paths, ``/health``, ``/metrics`` and the access log's redaction.

The same things through a real gunicorn are in ``test_hardening_http.py``."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from asgi_client import InProcessService
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from sse_upstream import InThreadUpstream

from shmstream import metrics
from shmstream.config import Settings
from shmstream.http.cors import ALLOW_HEADERS, ALLOW_METHODS, parse_origins
from shmstream.http.health import HealthProbe
from shmstream.relay.client import AsyncUpstream, HttpAsyncUpstream
from shmstream.relay.demo import AsyncDemoUpstream
from shmstream.relay.upstream import UpstreamError
from shmstream.serve.accesslog import redact_path, redact_query, redact_target
from shmstream.shm.store import ShmStore
from shmstream.store.ids import short_hash

JSON_TYPE = "application/json; charset=utf-8"
KEY = {"Authorization": "Bearer sekret"}


@pytest.fixture(scope="module")
def upstream_server():
    server = InThreadUpstream()
    yield server
    server.stop()


class App:
    def __init__(self, namespace: str, upstream_url: str, upstream=None, **options):
        options.setdefault("ping_interval", 0.1)
        self.settings = Settings(namespace=namespace, upstream=upstream_url, **options)
        self.store = ShmStore(namespace, capacity=options.get("max_bytes", 64 * 1024),
                              max_sessions=self.settings.max_sessions)
        self.service = InProcessService(self.store, self.settings,
                                        upstream or HttpAsyncUpstream(upstream_url))
        self.client = self.service.client

    def get(self, raw_uri: str, method: str = "GET", headers: dict | None = None, **kw):
        return self.client.request(method, raw_uri, headers=headers, **kw)

    def close(self) -> None:
        self.service.close()


@pytest.fixture
def make_app(namespace, upstream_server):
    made = []

    def make(upstream_url: str | None = None, **options) -> App:
        app = App(namespace, upstream_url or upstream_server.url, **options)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


@pytest.fixture
def app(make_app):
    return make_app()


def assert_error(result, status: int, error_type: str, message: str | None = None) -> dict:
    assert result.status_code == status, result.text
    assert result.headers["content-type"] == JSON_TYPE
    error = result.json["error"]
    assert error["code"] == status and error["type"] == error_type, error
    assert isinstance(error["message"], str) and error["message"]
    if message is not None:
        assert message in error["message"]
    return error


def chat(**script) -> dict:
    return {"stream": True, "messages": [], "script": {"events": 2, "interval": 0, **script}}


# --- conversation ids ----------------------------------------------------------------------

LONG = "x" * 513
CONTROL = ["a\tb", "a\x00b", "a\nb", "a\x1fb", "a\x7fb", "a\u0085b", "a\u009fb"]


@pytest.mark.parametrize("uri_template", ["/v1/stream/{}", "/v1/stream?conv_id={}"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_ids_too_long_or_with_control_characters_are_400(app, uri_template, method):
    from urllib.parse import quote

    error = assert_error(app.get(uri_template.format(LONG), method), 400,
                         "invalid_request_error", "longer than 512 bytes")
    assert error["message"].startswith("Invalid conversation id")
    # 512 bytes of UTF-8 is fine (171 three-byte characters would not be)
    assert app.get(uri_template.format("y" * 512), method).status_code in (404, 204)
    assert_error(app.get(uri_template.format(quote("é" * 257)), method), 400,
                 "invalid_request_error", "longer than 512 bytes")
    for bad in CONTROL:
        assert_error(app.get(uri_template.format(quote(bad, safe="")), method), 400,
                     "invalid_request_error", "control characters")


@pytest.mark.parametrize("value", [LONG.encode(), b"a\tb", b"a\x7fb", "a\u0085b".encode()])
def test_completion_ids_are_checked_the_same_way(app, value):
    result = app.client.simulate_post("/v1/chat/completions", body=json.dumps(chat()),
                                      headers={"X-Conversation-Id": value.decode("latin-1"),
                                               "Content-Type": "application/json"})
    assert_error(result, 400, "invalid_request_error", "Invalid conversation id")
    assert app.store.list() == []


def test_ids_with_slashes_colons_and_unicode_still_work(app):
    header = "ü/1::org/m".encode().decode("latin-1")  # WSGI's view of the UTF-8 bytes
    result = app.client.simulate_post("/v1/chat/completions", json=chat(),
                                      headers={"X-Conversation-Id": header})
    assert result.status_code == 200
    uri = "/v1/stream/%C3%BC%2F1::org%2Fm"
    assert app.get(uri).content == result.content


def test_lookup_ignores_unacceptable_ids_and_limits_their_number(app):
    app.store.create_or_replace("ok").close()
    body = {"conversation_ids": ["ok", LONG, *CONTROL, 5, None, ""]}
    found = app.client.simulate_post("/v1/streams/lookup", json=body).json
    assert [entry["conversation_id"] for entry in found] == ["ok"]
    thousand = {"conversation_ids": ["ok"] + [f"n{i}" for i in range(999)]}
    assert len(app.client.simulate_post("/v1/streams/lookup", json=thousand).json) == 1
    too_many = {"conversation_ids": [f"n{i}" for i in range(1001)]}
    assert_error(app.client.simulate_post("/v1/streams/lookup", json=too_many), 400,
                 "invalid_request_error", "at most 1000")


def test_lookup_body_over_one_mib_is_413(app):
    big = json.dumps({"conversation_ids": ["x"], "pad": "p" * (1024 * 1024)})
    assert_error(app.client.simulate_post("/v1/streams/lookup", body=big), 413,
                 "invalid_request_error")


def test_no_room_for_the_semaphore_is_503_and_leaves_nothing(app, namespace, monkeypatch):
    import posix_ipc

    from shmstream.shm import segment

    real = posix_ipc.Semaphore

    def no_room(name, flags=0, **options):
        if flags & posix_ipc.O_CREX == posix_ipc.O_CREX:  # creating, not opening
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(name, flags, **options)

    monkeypatch.setattr(posix_ipc, "Semaphore", no_room)
    result = app.client.simulate_post("/v1/chat/completions", json=chat(),
                                      headers={"X-Conversation-Id": "nosem"})
    assert_error(result, 503, "unavailable_error", "no room in /dev/shm")
    assert segment.list_names(namespace) == []
    assert segment.list_orphan_semaphores(namespace) == []


# --- CORS and the API key ------------------------------------------------------------------

PREFLIGHT = {"Origin": "https://chat.example", "Access-Control-Request-Method": "DELETE",
             "Access-Control-Request-Headers": "authorization,x-conversation-id"}


def test_preflight_is_answered_here_without_the_key(make_app, upstream_server):
    app = make_app(api_key="sekret")
    before = upstream_server.server.connections
    for path in ("/v1/stream/x", "/v1/chat/completions", "/v1/streams/lookup", "/anything"):
        result = app.client.simulate_options(path, headers=PREFLIGHT)
        assert result.status_code == 204 and result.content == b""
        assert result.headers["access-control-allow-origin"] == "*"
        assert result.headers["access-control-allow-methods"] == ALLOW_METHODS
        assert "DELETE" in ALLOW_METHODS
        assert result.headers["access-control-allow-headers"] == ALLOW_HEADERS
    assert upstream_server.server.connections == before  # never proxied


def test_answers_carry_allow_origin_also_errors_and_proxied(make_app):
    app = make_app(api_key="sekret")
    origin = {"Origin": "https://chat.example"}
    unauthorized = app.client.simulate_get("/v1/stream/x", headers=origin)
    assert_error(unauthorized, 401, "authentication_error")
    assert unauthorized.headers["access-control-allow-origin"] == "*"
    proxied = app.client.simulate_get("/_test/status/200", headers={**origin, **KEY})
    assert proxied.status_code == 200
    assert proxied.headers["access-control-allow-origin"] == "*"
    # a plain OPTIONS (no preflight) is not public: it would reach the upstream
    assert_error(app.client.simulate_options("/v1/chat/completions"), 401,
                 "authentication_error")
    assert "access-control-allow-origin" not in app.client.simulate_get("/health").headers


def test_configured_origins(make_app):
    app = make_app(cors_origins="https://a.example, https://B.example/")
    allowed = app.client.simulate_options("/v1/stream/x",
                                          headers={**PREFLIGHT, "Origin": "https://b.example"})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "https://b.example"
    assert "Origin" in allowed.headers["vary"]
    denied = app.client.simulate_options("/v1/stream/x",
                                         headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert_error(denied, 403, "permission_error", "Origin not allowed")
    assert "access-control-allow-origin" not in denied.headers
    answer = app.client.simulate_get("/v1/stream/x", headers={"Origin": "https://evil.example"})
    assert answer.status_code == 404 and "access-control-allow-origin" not in answer.headers
    assert parse_origins("none") == frozenset() and parse_origins("*") is None


def test_public_paths_and_the_key(make_app):
    app = make_app(api_key="sekret")
    for path in ("/health", "/v1/health", "/v1/models", "/models", "/shmstream/"):
        assert app.client.simulate_get(path).status_code == 200, path
    for method, path in (("GET", "/metrics"), ("POST", "/v1/streams/lookup"),
                         ("DELETE", "/v1/stream/x"), ("GET", "/v1/stream?conv_id=x"),
                         ("POST", "/v1/chat/completions")):
        assert_error(app.client.simulate_request(method, path), 401, "authentication_error")
    assert app.client.simulate_get("/metrics", headers=KEY).status_code == 200
    assert app.client.simulate_get("/metrics", headers={"X-Api-Key": "sekret"}).status_code == 200


# --- /health -------------------------------------------------------------------------------


class CountingUpstream(AsyncUpstream):
    """Answers /health with a chosen status, or fails like an unreachable server."""

    def __init__(self, status: int | None = 200):
        self.status = status
        self.calls = 0
        self.inner = AsyncDemoUpstream(1000)

    async def open(self, request):
        self.calls += 1
        if self.status is None:
            raise UpstreamError("upstream ConnectError: [Errno 111] Connection refused")
        response = await self.inner.open(request)
        response.status = self.status
        return response


def test_health_reports_upstream_store_and_shm(make_app):
    upstream = CountingUpstream()
    app = make_app(upstream=upstream, api_key="sekret")
    result = app.client.simulate_get("/health")
    assert result.status_code == 200 and result.headers["content-type"] == JSON_TYPE
    body = result.json
    assert body["status"] == "ok"
    assert body["upstream"]["reachable"] is True and body["upstream"]["status"] == 200
    assert body["upstream"]["health"] == {"status": "ok"}
    assert body["store"] == {"backend": "shm", "ok": True}
    assert body["shm"]["size_bytes"] >= body["shm"]["free_bytes"] > 0
    for _ in range(5):
        app.client.simulate_get("/v1/health")
    assert upstream.calls == 1  # cached
    assert app.client.simulate_head("/health").status_code == 200


@pytest.mark.parametrize("status", [None, 503])
def test_health_is_503_when_the_upstream_is_unreachable_or_unhealthy(make_app, status):
    app = make_app(upstream=CountingUpstream(status))
    result = app.client.simulate_get("/health")
    error = assert_error(result, 503, "unavailable_error")
    assert error["message"].startswith("upstream")
    assert result.json["status"] == "error" and "shm" in result.json
    if status is None:
        assert result.json["upstream"]["reachable"] is False
    else:
        assert result.json["upstream"]["status"] == 503


def test_health_of_a_server_without_a_health_route_is_ok(make_app):
    assert make_app(upstream=CountingUpstream(404)).client.simulate_get("/health").status_code \
        == 200


def test_health_probes_a_dead_http_upstream_quickly(namespace):
    store = ShmStore(namespace)
    probe = HealthProbe(HttpAsyncUpstream("http://127.0.0.1:9"), store, timeout=1.0)
    started = time.monotonic()
    result = asyncio.run(probe.check())
    assert result["upstream"]["reachable"] is False
    assert time.monotonic() - started < 1.5


# --- /metrics ------------------------------------------------------------------------------


def scrape(app: App) -> dict[str, float]:
    result = app.client.simulate_get("/metrics")
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/plain; version=")
    values = {}
    for family in text_string_to_metric_families(result.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_count_what_happens(make_app):
    app = make_app(max_bytes=4096)
    before = scrape(app)
    first = app.client.simulate_post("/v1/chat/completions",
                                     json=chat(events=60, pad=40, interval=0.002),
                                     headers={"X-Conversation-Id": "m1"})
    app.client.simulate_post("/v1/chat/completions", json=chat(),
                             headers={"X-Conversation-Id": "m1"})  # replaces it
    app.client.simulate_post("/v1/chat/completions", json=chat(status=500),
                             headers={"X-Conversation-Id": "m2"})
    assert_error(app.get("/v1/stream/m3"), 404, "not_found_error")
    app.client.simulate_post("/v1/chat/completions", json=chat(events=60, pad=40),
                             headers={"X-Conversation-Id": "m3"})
    assert app.get("/v1/stream/m3?from=0").status_code == 400  # dropped from a 4 KiB ring
    deadline = time.monotonic() + 20
    while True:  # a producer counts its end just after its readers saw it
        after = scrape(app)
        ended = sum(after[f"shmstream_sessions_ended_total{{state={state}}}"]
                    - before[f"shmstream_sessions_ended_total{{state={state}}}"]
                    for state in metrics.ENDED_STATES)
        if ended >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.02)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert len(first.content) > 4096
    assert delta("shmstream_sessions_created_total") == 4
    assert delta("shmstream_sessions_replaced_total") == 1
    assert delta("shmstream_upstream_errors_total{kind=status}") == 1
    assert delta("shmstream_offset_lost_total{phase=attach}") == 1
    assert delta("shmstream_sessions_ended_total{state=done}") == 3
    assert delta("shmstream_sessions_ended_total{state=failed}") == 1
    assert delta("shmstream_appended_bytes_total") >= 2 * len(first.content)
    assert after["shmstream_sessions{state=done}"] == 2  # m1 (the second) and m3
    assert after["shmstream_sessions{state=failed}"] == 1
    assert after["shmstream_sessions{state=running}"] == 0
    held = sum(info.total_bytes - info.dropped_bytes for info in app.store.list())
    assert after["shmstream_session_held_bytes"] == held
    assert after["shmstream_session_capacity_bytes"] == 3 * 4096
    assert after["shmstream_shm_size_bytes"] >= after["shmstream_shm_free_bytes"] > 0


def test_metrics_readers_gauge_and_cancel_latency(make_app):
    app = make_app()
    before = scrape(app)
    posted = {}

    def post():
        posted["r"] = app.client.simulate_post(
            "/v1/chat/completions", json=chat(events=4, stall_at=1, stall=30),
            headers={"X-Conversation-Id": "slow"})

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while scrape(app)["shmstream_readers"] - before["shmstream_readers"] < 1:
        assert time.monotonic() < deadline, "the caller's reader was not counted"
        time.sleep(0.02)
    assert app.client.simulate_delete("/v1/stream/slow").status_code == 204
    thread.join(20)
    deadline = time.monotonic() + 20
    while True:  # the relay counts the cancel latency, then the ended session: wait for both
        after = scrape(app)
        if after["shmstream_cancel_latency_seconds_count"] > before.get(
                "shmstream_cancel_latency_seconds_count", 0) and \
                after["shmstream_sessions_ended_total{state=cancelled}"] >= 1:
            break
        assert time.monotonic() < deadline, "no cancel latency or ended session observed"
        time.sleep(0.02)
    assert after["shmstream_readers"] == before["shmstream_readers"]
    latency = (after["shmstream_cancel_latency_seconds_sum"]
               - before.get("shmstream_cancel_latency_seconds_sum", 0))
    assert 0 <= latency < 1.0
    assert after["shmstream_sessions_ended_total{state=cancelled}"] >= 1


def test_metrics_count_unreachable_upstreams(make_app):
    app = make_app(upstream_url="http://127.0.0.1:9")
    before = scrape(app)
    result = app.client.simulate_post("/v1/chat/completions", json=chat(),
                                      headers={"X-Conversation-Id": "dead"})
    assert result.status_code == 502
    assert app.client.simulate_get("/v1/models").status_code == 502
    unreachable = "shmstream_upstream_errors_total{kind=unreachable}"
    proxy = "shmstream_upstream_errors_total{kind=proxy}"
    # The relay counts its failure on its own thread, maybe after the 502 went out.
    assert wait_until(lambda: scrape(app)[unreachable] == before[unreachable] + 1, timeout=20)
    after = scrape(app)
    assert after[unreachable] == before[unreachable] + 1
    assert after[proxy] == before[proxy] + 1


def test_metric_files_are_reserved(tmp_path):
    metrics.reserve_files(str(tmp_path), 4242)
    for kind in metrics.FILE_KINDS:
        info = os.stat(tmp_path / f"{kind}_4242.db")
        assert info.st_size == metrics.RESERVED_FILE_BYTES
        assert info.st_blocks * 512 >= metrics.RESERVED_FILE_BYTES  # pages allocated
        assert info.st_mode & 0o777 == 0o600


_NO_ROOM = """
import errno, os, sys
from shmstream import metrics
def no_room(fd, offset, length):
    raise OSError(errno.ENOSPC, "No space left on device")
os.posix_fallocate = no_room
assert metrics.get() is None
metrics.session_created(False)
metrics.bytes_appended(10)
metrics.reader_attached()
print("ok")
"""


def test_metrics_turn_off_rather_than_risk_sigbus(tmp_path):
    env = {**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _NO_ROOM], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "metrics off" in done.stderr and os.strerror(errno.ENOSPC) in done.stderr
    assert os.listdir(tmp_path) == []


# --- the access log ------------------------------------------------------------------------


def test_access_log_redaction():
    tag = "~" + short_hash("chat/1::m")
    assert redact_path("/v1/stream/chat%2F1::m", encoded=True) == "/v1/stream/" + tag
    assert redact_path("/v1/stream/chat/1::m", encoded=False) == "/v1/stream/" + tag
    assert redact_path("/v1/models", encoded=False) == "/v1/models"
    assert redact_query("conv_id=chat%2F1%3A%3Am&from=5") == f"conv_id={tag}&from=5"
    assert redact_query("from=5") == "from=5"
    assert redact_target("/v1/stream?conv_id=secret") == \
        "/v1/stream?conv_id=~" + short_hash("secret")
    assert "secret" not in redact_target("/v1/stream/secret?from=1")
    assert redact_path("/v1/stream/%FF", encoded=True) == "/v1/stream/~invalid"


def test_health_and_metrics_on_every_backend(store_factory, upstream_server):
    store = store_factory()
    settings = Settings(namespace=store_factory.namespace, upstream=upstream_server.url,
                        backend="shm" if store_factory.backend == "shm" else "redis://x")
    service = InProcessService(store, settings, HttpAsyncUpstream(upstream_server.url))
    client = service.client
    try:
        assert client.simulate_post("/v1/chat/completions", json=chat(),
                                    headers={"X-Conversation-Id": "b"}).status_code == 200
        health = client.simulate_get("/health")
        assert health.status_code == 200
        assert health.json["store"] == {"backend": store_factory.backend, "ok": True}
        text = client.simulate_get("/metrics").text
        values = {sample.name + str(sorted(sample.labels.items())): sample.value
                  for family in text_string_to_metric_families(text)
                  for sample in family.samples}
        assert values["shmstream_sessions[('state', 'done')]"] == 1
    finally:
        service.close()
