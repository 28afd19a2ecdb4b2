"""A throwaway ``redis-server`` for tests and benchmarks (not part of the package)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import redis


class LocalRedisServer:
    """A ``redis-server`` on a free loopback port with persistence off, for tests and
    benchmarks. ``with LocalRedisServer() as url: ...`` or ``start()``/``stop()``."""

    def __init__(self, executable: str = "redis-server"):
        self.executable = shutil.which(executable) or executable
        self.process: subprocess.Popen | None = None
        self.url = ""
        self._dir = ""

    @staticmethod
    def available(executable: str = "redis-server") -> bool:
        return shutil.which(executable) is not None

    def start(self, timeout: float = 10.0) -> str:
        """Start it and wait until it answers PING; returns its URL. Raises RuntimeError."""
        self._dir = tempfile.mkdtemp(prefix="shmstream-redis-")
        last_error = None
        for _attempt in range(5):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            last_error = self._launch(port, timeout)
            if last_error is None:
                return self.url
            self._kill()  # the port was taken meanwhile, or the server failed: try again
        raise RuntimeError(f"redis-server did not start: {last_error}")

    def kill(self) -> None:
        """Stop the server as an outage would (SIGKILL, no goodbye); :meth:`restart` brings
        it back on the same port, empty."""
        if self.process is not None:
            self.process.kill()
            self._kill()

    def restart(self, timeout: float = 10.0) -> str:
        """Start it again on the port it had. Raises RuntimeError if it does not answer."""
        self._kill()
        port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        error = self._launch(port, timeout)
        if error is not None:
            self._kill()
            raise RuntimeError(f"redis-server did not restart on port {port}: {error}")
        return self.url

    def _launch(self, port: int, timeout: float) -> Exception | None:
        """Start on ``port`` and wait for PING: None once it answers, else the last error."""
        self.process = subprocess.Popen(
            [self.executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir, "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        last_error: Exception | None = RuntimeError("redis-server exited at once")
        try:
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    client.ping()
                    self.url = url
                    return None
                except redis.ConnectionError as exc:
                    last_error = exc
                    time.sleep(0.02)  # polling a starting server: no event to wait on
        finally:
            client.close()
        return last_error

    def _kill(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def stop(self) -> None:
        self._kill()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
