"""``GET /health``: shmstream's own health, with the upstream's inside.

The answer is 200 with ``"status": "ok"`` when the upstream answers its ``/health`` with a
status below 500 (a 404 from a server without that route still proves it is up) and the
session store answers a lookup; otherwise 503, with the error body every shmstream error
has plus the same details. The upstream probe and the store check are cached for
``PROBE_INTERVAL`` seconds per process and time out after ``PROBE_TIMEOUT``, so a load
balancer polling every worker costs the upstream at most one request per worker per
interval. /dev/shm usage is read fresh (one ``statvfs``).

It is public, like llama-server's ``/health``: it shows no id, key or upstream URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import falcon

from shmstream.relay.client import AsyncUpstream, AsyncUpstreamRequest
from shmstream.relay.upstream import JSON_TYPE, error_object
from shmstream.store.interface import SessionStore

PROBE_INTERVAL = 3.0  # seconds a probe result is reused
PROBE_TIMEOUT = 2.0  # seconds the upstream may take to answer its /health
MAX_HEALTH_BODY = 4096  # bytes of the upstream's health answer we include
SHM_DIR = "/dev/shm"
# No HTTP client can create this id (control characters are rejected): a guaranteed miss.
_PROBE_ID = "\x00shmstream-health-probe"


def _upstream_body(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        text = raw.decode("utf-8", "replace").strip()
        return text[:512] or None


def shm_usage(path: str = SHM_DIR) -> dict:
    try:
        stats = os.statvfs(path)
    except OSError as exc:
        return {"path": path, "error": exc.strerror or str(exc)}
    size = stats.f_blocks * stats.f_frsize
    free = stats.f_bavail * stats.f_frsize
    return {"path": path, "size_bytes": size, "used_bytes": size - stats.f_bfree * stats.f_frsize,
            "free_bytes": free}


class HealthProbe:
    """The cached upstream and store checks of one process (one event loop)."""

    def __init__(self, upstream: AsyncUpstream, store: SessionStore, backend: str = "shm",
                 upstream_api_key: str | None = None, interval: float = PROBE_INTERVAL,
                 timeout: float = PROBE_TIMEOUT):
        self.upstream = upstream
        self.store = store
        self.backend = "shm" if backend == "shm" else backend.split(":", 1)[0]
        self.upstream_api_key = upstream_api_key
        self.interval = interval
        self.timeout = timeout
        self._lock: asyncio.Lock | None = None
        self._checked = -1e18
        self._result: dict = {}

    async def check(self) -> dict:
        """``{"upstream": {...}, "store": {...}}``, at most ``interval`` seconds old."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # concurrent callers wait for one probe instead of sending theirs
            if time.monotonic() - self._checked >= self.interval:
                self._result = {"upstream": await self._probe_upstream(),
                                "store": self._probe_store()}
                self._checked = time.monotonic()
            return self._result

    def _headers(self) -> list[tuple[str, str]]:
        if self.upstream_api_key:
            return [("Authorization", f"Bearer {self.upstream_api_key}")]
        return []

    async def _probe_upstream(self) -> dict:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                status, raw = await self._probe()
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no answer within {self.timeout:g} s")
            return {"reachable": False, "error": f"{type(exc).__name__}: {exc}"[:300],
                    "latency_ms": round((time.monotonic() - started) * 1000, 1),
                    "checked_at": int(time.time())}
        return {"reachable": True, "status": status, "health": _upstream_body(raw),
                "latency_ms": round((time.monotonic() - started) * 1000, 1),
                "checked_at": int(time.time())}

    async def _probe(self) -> tuple[int, bytes]:
        response = await self.upstream.open(
            AsyncUpstreamRequest("GET", "/health", self._headers(), b""))
        try:
            return response.status, await response.read(MAX_HEALTH_BODY)
        finally:
            await response.aclose()

    def _probe_store(self) -> dict:
        try:
            session = self.store.get(_PROBE_ID)
            if session is not None:
                session.close()
        except Exception as exc:
            return {"backend": self.backend, "ok": False,
                    "error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"backend": self.backend, "ok": True}


class HealthResource:
    """``GET``/``HEAD`` ``/health`` and ``/v1/health``."""

    def __init__(self, probe: HealthProbe):
        self.probe = probe

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks = await self.probe.check()
        upstream, store = checks["upstream"], checks["store"]
        body: dict = {"status": "ok", "upstream": upstream, "store": store,
                      "shm": shm_usage()}
        problem = None
        if not upstream.get("reachable"):
            problem = f"upstream unreachable: {upstream.get('error', '')}".rstrip(": ")
        elif upstream.get("status", 0) >= 500:
            problem = f"upstream unhealthy: its /health answered {upstream['status']}"
        elif not store.get("ok"):
            problem = f"session store unavailable: {store.get('error', '')}"
        if problem is not None:
            body = {"error": error_object(503, problem, "unavailable_error"),
                    **body, "status": "error"}
        resp.status = 503 if problem else 200
        resp.content_type = JSON_TYPE
        resp.set_header("Cache-Control", "no-store")
        resp.data = json.dumps(body).encode()

    on_head = on_get
