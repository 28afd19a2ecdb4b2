"""The real llama-server for tests: find the cached build, start it on a free loopback port
with the tiny random model (tests/llama_model.py), read its slots, and find which process of
a service relays to it.

The binary is prepared by ``python3 scripts/llama_server.py`` (``.ci/run`` does it when the
cache is missing). Without it the llama tests fail with that command, unless
``SHMSTREAM_ALLOW_NO_LLAMA=1`` makes them skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from service import ROOT, free_port, stop_gracefully

ALLOW_MISSING_ENV = "SHMSTREAM_ALLOW_NO_LLAMA"
PREPARE_COMMAND = "python3 scripts/llama_server.py"
PARALLEL = 4  # slots
CONTEXT = 16384  # tokens, shared by the slots (unified KV cache), each may use all
DEFAULT_MAX_TOKENS = 400  # for requests that set none (the web UI's)


def _prepare_module():
    spec = importlib.util.spec_from_file_location(
        "llama_server_prepare", os.path.join(ROOT, "scripts", "llama_server.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = _prepare_module()


def cache_dir() -> Path:
    return prepare.cache_dir()


def binary() -> Path:
    return cache_dir() / "bin" / "llama-server"


def vocab(name: str) -> Path:
    return cache_dir() / "vocab" / name


def require_llama() -> None:
    """Fail (or skip with SHMSTREAM_ALLOW_NO_LLAMA=1) when the cached build is missing."""
    if prepare.is_ready(cache_dir()):
        return
    message = (f"the real llama-server is not prepared in {cache_dir()}: run "
               f"`{PREPARE_COMMAND}` (10-20 minutes, once; .ci/run does it)")
    if os.environ.get(ALLOW_MISSING_ENV) == "1":
        pytest.skip(f"{message}; skipped because {ALLOW_MISSING_ENV}=1")
    pytest.fail(f"{message}. Set {ALLOW_MISSING_ENV}=1 to skip these tests instead.")


class LlamaServer:
    """``llama-server`` with ``model`` on a free loopback port, ``PARALLEL`` slots."""

    def __init__(self, model: Path, log_dir: Path, parallel: int = PARALLEL):
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.parallel = parallel
        self.log_path = Path(log_dir) / "llama-server.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [str(binary()), "--model", str(self.model), "--host", "127.0.0.1",
                "--port", str(self.port), "--parallel", str(self.parallel),
                "--ctx-size", str(CONTEXT), "--kv-unified", "--n-predict",
                str(DEFAULT_MAX_TOKENS), "--threads", "1", "--threads-batch", "1",
                "--slots", "--no-warmup", "--alias", "tiny"]

    def start(self, timeout: float = 120.0) -> LlamaServer:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.process.returncode}):\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def slots(self) -> list[dict]:
        response = httpx.get(self.url + "/slots", timeout=10)
        response.raise_for_status()
        return response.json()

    def busy(self) -> list[dict]:
        """The slots generating right now."""
        return [slot for slot in self.slots() if slot.get("is_processing")]

    def stop(self) -> None:
        stop_gracefully(self.process)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --- which process relays -------------------------------------------------------------------


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants (by parent pid, read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces: split after it
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree.add(pid)
        todo.extend(children.get(pid, []))
    return tree


def _established_to(port: int) -> dict[int, tuple[str, int]]:
    """Socket inode -> (local address, local port) of every established TCP connection
    whose remote end is ``port`` on this host (from /proc/net/tcp and tcp6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if state != "01" or inode == 0:  # 01: ESTABLISHED
                continue
            if int(remote.rsplit(":", 1)[1], 16) == port:
                address, local_port = local.rsplit(":", 1)
                found[inode] = (address, int(local_port, 16))
    return found


_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


def upstream_connections(root: int, port: int) -> dict[int, list[int]]:
    """pid -> the local ports of its established connections to ``port``, for every process
    in ``root``'s tree (the service's processes, whatever their roles)."""
    wanted = _established_to(port)
    owners: dict[int, list[int]] = {}
    for pid in sorted(process_tree(root)):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            match = _SOCKET_LINK.fullmatch(link)
            if match and int(match[1]) in wanted:
                owners.setdefault(pid, []).append(wanted[int(match[1])][1])
    return owners


def _bytes_received(port: int) -> dict[int, int]:
    """local port -> bytes received, for connections to ``port`` (``ss -i``; empty when ss
    is missing)."""
    try:
        out = subprocess.run(["ss", "-Htni", "state", "established", f"( dport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    counts, current = {}, None
    for line in out.splitlines():
        ports = re.match(r"\s*\S+\s+\S+\s+(\S+):(\d+)\s+\S+", line)
        if ports and not line.startswith(("\t", " ")):
            current = int(ports[2])
            continue
        received = re.search(r"bytes_received:(\d+)", line)
        if received and current is not None:
            counts[current] = int(received[1])
            current = None
    return counts


def relaying_process(root: int, port: int, timeout: float = 20.0) -> int:
    """The pid, in ``root``'s tree, that owns the connection on which llama-server (on
    ``port``) is streaming right now: among the service's connections to it, the one whose
    received byte count grows (idle pooled connections do not). Raises AssertionError when
    none is found within ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        owners = upstream_connections(root, port)
        by_port = {local: pid for pid, ports in owners.items() for local in ports}
        if len(owners) == 1:
            return next(iter(owners))
        counts = _bytes_received(port)
        if last is not None:
            growing = {by_port[p] for p, n in counts.items()
                       if p in by_port and n > last.get(p, n)}
            if len(growing) == 1:
                return growing.pop()
        last = counts
        time.sleep(0.2)
    raise AssertionError(f"no single process of the service streams from port {port}: "
                         f"{upstream_connections(root, port)}")
