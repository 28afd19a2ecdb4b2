"""Start the real service (gunicorn with its asgi workers) for integration tests and the
benchmark, and always stop it.

Uses the repository's ``gunicorn.conf.py`` (settings from ``SHMSTREAM_*``); the access log
records the worker pid of every request so tests can see which worker served what.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
ACCESS_FORMAT = '%(p)s %(m)s %(U)s?%(q)s %(s)s'
_ACCESS_LINE = re.compile(r"<(\d+)> (\S+) (\S+) (\d+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gunicorn() -> str:
    local = os.path.join(VENV_BIN, "gunicorn")
    return local if os.path.exists(local) else "gunicorn"


def stop_gracefully(process: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM a server started in its own process group; SIGKILL the group if it has not
    exited within ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


class Service:
    """``gunicorn -c gunicorn.conf.py`` on a free port, with ``workers`` asgi workers."""

    def __init__(self, namespace: str, upstream: str | None, log_dir: str, workers: int = 3,
                 threads: int = 16, access_log: bool = True, **settings):
        self.namespace = namespace
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.access_log = os.path.join(log_dir, "access.log")
        self.error_log = os.path.join(log_dir, "gunicorn.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHMSTREAM_")}
        env.update({
            "SHMSTREAM_NAMESPACE": namespace,
            "SHMSTREAM_BIND": f"127.0.0.1:{self.port}",
            "SHMSTREAM_WORKERS": str(workers),
            "SHMSTREAM_THREADS": str(threads),
            "SHMSTREAM_GRACEFUL_TIMEOUT": "3",
            # One relay unless a test asks for more (relays=N): the fault tests kill "the"
            # relay. The default, one per CPU, runs in test_relay_process's several-relay test.
            "SHMSTREAM_RELAYS": "1",
        })
        if access_log:  # the tests read it; benchmarks run the default, none
            env["SHMSTREAM_ACCESS_LOG"] = self.access_log
        if upstream:
            env["SHMSTREAM_UPSTREAM"] = upstream
        for key, value in settings.items():
            env["SHMSTREAM_" + key.upper()] = str(value)
        self.env = env
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        conf = os.path.join(ROOT, "gunicorn.conf.py")
        if os.path.exists(conf):
            return [_gunicorn(), "-c", conf, "--access-logformat", ACCESS_FORMAT]
        return [_gunicorn(), "-k", "asgi", "-w", str(self.workers),
                "-b", self.env["SHMSTREAM_BIND"],
                "--graceful-timeout", "3", "--access-logfile", self.access_log,
                "--access-logformat", ACCESS_FORMAT, "shmstream.serve.asgi:application"]

    def start(self, timeout: float = 30.0) -> Service:
        with open(self.error_log, "ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=ROOT, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log_tail()}")
            booted = self.log_text().count("Booting worker with pid")
            if booted >= self.workers:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + "/health", timeout=2).status_code < 500:
                        return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn did not become ready: {self.log_tail()}")

    def log_text(self) -> str:
        try:
            with open(self.error_log, errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def access(self) -> list[tuple[int, str, str, int]]:
        """(pid, method, path?query, status) of every logged request."""
        try:
            with open(self.access_log) as log:
                text = log.read()
        except FileNotFoundError:
            return []
        return [(int(m[1]), m[2], m[3], int(m[4])) for m in _ACCESS_LINE.finditer(text)]

    def stop(self) -> None:
        stop_gracefully(self.process)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
