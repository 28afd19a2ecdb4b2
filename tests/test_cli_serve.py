"""``shmstream serve`` and the command itself, run as a new operator runs them: the real CLI in
a subprocess, the real gunicorn behind it (issue 14: start-up, settings, refusals)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from polling import wait_for
from service import free_port

from shmstream.serve import namespace_lock

RUN_TIMEOUT = 30


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMSTREAM_")}
    env.update(extra)
    return env


def shmstream(*argv: str, env: dict | None = None, timeout: float = RUN_TIMEOUT):
    return subprocess.run([sys.executable, "-m", "shmstream", *argv], env=env or _env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)


class Serve:
    """A running ``shmstream serve`` (one worker) on a free port; always stopped."""

    def __init__(self, namespace: str, *flags: str, log_path: str, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "shmstream", "serve", "--bind",
                     f"127.0.0.1:{self.port}", "--workers", "1", *flags]
        self.env = _env(SHMSTREAM_NAMESPACE=namespace, SHMSTREAM_GRACEFUL_TIMEOUT="2", **env)
        self.process: subprocess.Popen | None = None

    def start(self) -> Serve:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

        def answers():
            assert self.process.poll() is None, self.log()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/health", timeout=2).status_code < 500
            return False

        wait_for(answers, timeout=60, interval=0.1)
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- the command ------------------------------------------------------------------------


def test_version_help_and_python_dash_m():
    from shmstream import __version__

    result = shmstream("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"shmstream {__version__}"
    console = shutil.which("shmstream", path=os.path.dirname(sys.executable))
    assert console, "the console script is installed beside the interpreter"
    result = subprocess.run([console, "--help"], capture_output=True, text=True, check=False,
                            timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "``" not in result.stdout and ":class:" not in result.stdout  # no raw reST
    serve_help = shmstream("serve", "--help").stdout
    for text in ("--max-bytes SIZE", "SHMSTREAM_MAX_BYTES", "default 4 MiB", "--ttl DURATION",
                 "default 300 s", "--bind HOST:PORT", "SHMSTREAM_LOG_LEVEL"):
        assert text in serve_help, text


@pytest.mark.parametrize(("argv", "env", "named"), [
    ([], {"SHMSTREAM_TTL": "-1"}, "SHMSTREAM_TTL"),
    ([], {"SHMSTREAM_MAX_BYTES": "abc"}, "SHMSTREAM_MAX_BYTES"),
    ([], {"SHMSTREAM_WORKERS": "abc"}, "SHMSTREAM_WORKERS"),
    (["--max-bytes", "12 parsecs"], {}, "--max-bytes"),
    (["--upstream", "notaurl"], {}, "--upstream"),
    (["--upstream", "ftp://example.com/"], {}, "--upstream"),
    (["--backend", "memcached://x"], {}, "--backend"),
    (["--bind", "8080"], {}, "--bind"),
])
def test_a_bad_setting_stops_the_start_with_one_line(argv, env, named, namespace):
    result = shmstream("serve", "--namespace", namespace, *argv,
                       env=_env(**env))
    assert result.returncode == 2
    _one_line_error(result, named, "expected")
    assert not os.path.exists(namespace_lock.lock_path(namespace))  # nothing touched


def test_a_port_in_use_gets_a_hint_about_bind(namespace):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = shmstream("serve", "--namespace", namespace, "--bind", f"127.0.0.1:{port}")
    _one_line_error(result, f"127.0.0.1:{port}", "--bind")


def test_an_unreachable_store_refuses_to_start(namespace):
    result = shmstream("serve", "--namespace", namespace, "--bind", f"127.0.0.1:{free_port()}",
                       env=_env(SHMSTREAM_BACKEND="redis://127.0.0.1:1"))
    assert result.returncode == 1
    _one_line_error(result, "session store", "redis://127.0.0.1:1")
    assert "ready" not in result.stdout + result.stderr
    assert not os.path.exists(namespace_lock.lock_path(namespace))  # released, removed


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare for a private read-only /dev/shm")
def test_a_read_only_dev_shm_refuses_to_start():
    # A private mount namespace: the machine's /dev/shm is untouched.
    script = (f"mount -t tmpfs -o ro,size=1m tmpfs /dev/shm && exec {sys.executable} -m "
              f"shmstream serve --bind 127.0.0.1:{free_port()}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], env=_env(),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert result.returncode == 1
    _one_line_error(result, "/dev/shm", "writable")


# --- serving ----------------------------------------------------------------------------


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match[1])


def _complete(url: str, conversation_id: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      headers={"X-Conversation-Id": conversation_id},
                      json={"stream": True, "messages": [{"role": "user", "content": "hi"}]})


def test_a_second_service_on_the_namespace_is_refused_and_the_first_unharmed(namespace,
                                                                             tmp_path):
    with Serve(namespace, "--demo-tokens-per-second", "1000",
               log_path=str(tmp_path / "first.log")) as first:
        assert _complete(first.url, "chat-1").status_code == 200
        created = _metric(first.url, "shmstream_sessions_created_total")
        assert created >= 1
        metrics_dir = f"/dev/shm/{namespace}.metrics"
        assert os.path.isdir(metrics_dir)

        second = shmstream("serve", "--namespace", namespace, "--bind",
                           f"127.0.0.1:{free_port()}")
        assert second.returncode == 1
        _one_line_error(second, repr(namespace), "in use", str(first.process.pid))
        # The first service's counters and metrics directory are as they were.
        assert os.path.isdir(metrics_dir)
        assert _metric(first.url, "shmstream_sessions_created_total") == created
        purge = shmstream("purge", "--namespace", namespace, "--yes")
        assert purge.returncode == 1 and "in use by a running service" in purge.stderr
        assert _complete(first.url, "chat-2").status_code == 200
    assert first.process.returncode == 0
    assert not os.path.exists(namespace_lock.lock_path(namespace))
    # Once the first is gone, the namespace is free again.
    with Serve(namespace, log_path=str(tmp_path / "again.log")) as again:
        assert httpx.get(again.url + "/health", timeout=10).status_code == 200


def test_a_killed_service_leaves_no_stale_lock(namespace, tmp_path):
    first = Serve(namespace, log_path=str(tmp_path / "killed.log")).start()
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(10)
    with Serve(namespace, log_path=str(tmp_path / "next.log")) as second:
        assert httpx.get(second.url + "/health", timeout=10).status_code == 200
    with contextlib.suppress(FileNotFoundError):  # the killed one could not clean up
        os.unlink(f"/dev/shm/{namespace}.metrics")


def test_an_openai_base_url_upstream_does_not_double_v1(namespace, tmp_path, upstream):
    with Serve(namespace, "--upstream", upstream.url + "/v1/",
               log_path=str(tmp_path / "serve.log")) as service:
        answer = httpx.get(service.url + "/v1/models", timeout=10)
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.text)["target"] == "/v1/models"  # not /v1/v1/models


def test_sizes_and_durations_take_units(namespace, tmp_path):
    with Serve(namespace, "--max-bytes", "1M", "--ttl", "5m",
               log_path=str(tmp_path / "serve.log")) as service:
        assert _complete(service.url, "units").status_code == 200
        answer = httpx.post(service.url + "/v1/streams/lookup", timeout=10,
                            json={"conversation_ids": ["units"]})
        assert answer.status_code == 200
        log = wait_for(lambda: "ready" in service.log() and service.log())
        assert "max_bytes=1048576" in log and "ttl=300s" in log


def _start_redis(port: int, directory: str) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", directory], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)

    def answers():
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(answers, timeout=20, interval=0.05)
    return process


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_a_store_outage_is_logged_once_each_way_and_recovers(namespace, tmp_path):
    port = free_port()
    redis_process = _start_redis(port, str(tmp_path))
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with Serve(namespace, "--gc-interval", "1s", log_path=str(tmp_path / "serve.log"),
                   SHMSTREAM_BACKEND=url) as service:
            redis_process.terminate()
            redis_process.wait(10)
            wait_for(lambda: "store unavailable" in service.log(), timeout=30)
            tracebacks = service.log().count("Traceback")
            # Several supervisor passes (every 0.5 s) later: still one line, no new traceback.
            started = time.monotonic()
            wait_for(lambda: time.monotonic() - started > 3, timeout=10, interval=0.2)
            log = service.log()
            assert log.count("store unavailable") == 1, log
            assert log.count("Traceback") == tracebacks, log
            redis_process = _start_redis(port, str(tmp_path))
            wait_for(lambda: "store available again" in service.log(), timeout=30)
            answer = wait_for(lambda: (r := _complete(service.url, "after")).status_code == 200
                              and r, timeout=30, interval=0.2)
            assert b"[DONE]" in answer.content
    finally:
        redis_process.terminate()
        redis_process.wait(10)


@pytest.mark.parametrize(("env", "needles"), [
    ({"SHMSTREAM_WORKERS": "abc"}, ("SHMSTREAM_WORKERS", "a whole number")),
    ({"SHMSTREAM_BACKEND": "redis://127.0.0.1:1"}, ("session store", "does not answer")),
])
def test_the_repository_gunicorn_conf_refuses_the_same_way(namespace, env, needles):
    # `gunicorn -c gunicorn.conf.py`, the other documented start, checks the same things.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    result = subprocess.run(
        [gunicorn, "-c", os.path.join(root, "gunicorn.conf.py")], cwd=root,
        env=_env(SHMSTREAM_NAMESPACE=namespace, SHMSTREAM_BIND=f"127.0.0.1:{free_port()}",
                 **env), capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert all(needle in output for needle in needles), output
    assert "ready" not in output
    assert not os.path.exists(namespace_lock.lock_path(namespace))


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_while_the_store_is_down_requests_get_503_unavailable(namespace, tmp_path):
    port = free_port()
    redis_process = _start_redis(port, str(tmp_path))
    try:
        with Serve(namespace, log_path=str(tmp_path / "serve.log"),
                   SHMSTREAM_BACKEND=f"redis://127.0.0.1:{port}/0") as service:
            assert _complete(service.url, "before").status_code == 200
            redis_process.terminate()
            redis_process.wait(10)
            answers = [_complete(service.url, "during"),
                       httpx.post(service.url + "/v1/streams/lookup", timeout=10,
                                  json={"conversation_ids": ["before"]}),
                       httpx.get(service.url + "/metrics", timeout=10)]
            for answer in answers:
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["type"] == "unavailable_error"
                # The store's outage, not a quota or a full store.
                assert "session store unavailable" in answer.json()["error"]["message"]
            # Answered, not crashed: no traceback in any process for these requests.
            assert "Traceback" not in service.log(), service.log()
    finally:
        redis_process.terminate()
        redis_process.wait(10)
