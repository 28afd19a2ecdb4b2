"""The operator's segment tools, run as the real CLI in a subprocess against sessions made
through ShmStore in this process (as a server's workers would make them)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from shmstream.cli import main as cli
from shmstream.cli import snapshot as snapshot_module
from shmstream.cli import tools
from shmstream.shm import segment
from shmstream.shm.store import ShmStore
from shmstream.store.errors import OffsetLost
from shmstream.store.states import State

RUN_TIMEOUT = 30  # seconds any one CLI call may take


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMSTREAM_")}
    env.update(extra)
    return env


def shmstream(*argv: str, env: dict | None = None, stdin=subprocess.DEVNULL,
              input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``shmstream ARGV`` to completion (bounded), capturing bytes."""
    return subprocess.run(
        [sys.executable, "-m", "shmstream", *argv],
        env=env or _clean_env(), stdin=None if input is not None else stdin, input=input,
        capture_output=True, timeout=RUN_TIMEOUT, check=False,
    )


def _leftovers(namespace: str) -> list[str]:
    return [e for e in os.listdir(segment.SHM_DIR)
            if e.startswith((namespace + ".", "sem." + namespace + "."))]


@pytest.fixture
def store(namespace):
    return ShmStore(namespace, capacity=64 * 1024)


def _make(store: ShmStore, conversation_id: str, chunks: list[bytes],
          state: State | None = State.DONE, metadata: dict | None = None):
    session = store.create_or_replace(conversation_id, metadata)
    for chunk in chunks:
        assert session.append(chunk)
    if state is not None:
        session.finalize(state)
    return session


def _wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


EVENTS = [b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n', b":\n\n",
          b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n', b"data: [DONE]\n\n"]


# --- ls -----------------------------------------------------------------------------------


def test_ls_shows_sessions_as_a_table_and_json(store, namespace):
    done = _make(store, "chat-1::llama/3-8b", EVENTS, metadata={"model": "llama/3-8b"})
    hostile = "evil\x1b[2J\u202e" + "x" * 100
    running = _make(store, hostile, [b"data: 1\n\n"], state=None)
    try:
        result = shmstream("ls", "--namespace", namespace)
        assert result.returncode == 0, result.stderr
        table = result.stdout.decode()
        assert "\x1b" not in table and "\u202e" not in table  # escaped, not interpreted
        assert "chat-1::llama/3-8b" in table
        assert "evil\\x1b[2J\\u202e" in table
        assert "x" * 100 not in table  # long ids are shortened
        lines = table.splitlines()
        assert lines[0].split() == ["ID", "STATE", "HELD", "ALLOCATED", "TOTAL", "AGE",
                                    "ENDED", "PRODUCER", "WAITING"]
        assert len(lines) == 3
        # A finished session's producer is not "alive": it finished (issue 14).
        assert "done" in lines[1] and "finished" in lines[1] and "alive" not in lines[1]
        assert f"{sum(map(len, EVENTS))} B" in lines[1]  # held bytes, beside allocated
        assert "running" in lines[2] and f"alive (pid {os.getpid()})" in lines[2]

        result = shmstream("ls", "--namespace", namespace, "--json")
        assert result.returncode == 0, result.stderr
        entries = {e["conversation_id"]: e for e in json.loads(result.stdout)}
        assert set(entries) == {"chat-1::llama/3-8b", hostile}
        entry = entries["chat-1::llama/3-8b"]
        assert entry["state"] == "done"
        assert entry["total_bytes"] == sum(map(len, EVENTS))
        assert entry["dropped_bytes"] == 0
        assert entry["producer_pid"] == os.getpid() and entry["producer_alive"] is None
        assert entry["held_bytes"] == sum(map(len, EVENTS))
        assert entries[hostile]["producer_alive"] is True
        assert entry["waiting_readers"] == 0
        assert entry["metadata"]["model"] == "llama/3-8b"
        assert entries[hostile]["state"] == "running"
    finally:
        done.close()
        running.close()


def test_ls_takes_the_namespace_from_the_environment(store, namespace):
    _make(store, "from-env", [b"x"]).close()
    result = shmstream("ls", "--json", env=_clean_env(SHMSTREAM_NAMESPACE=namespace))
    assert result.returncode == 0, result.stderr
    assert [e["conversation_id"] for e in json.loads(result.stdout)] == ["from-env"]


def test_ls_of_an_empty_namespace(namespace):
    result = shmstream("ls", "--namespace", namespace)
    assert result.returncode == 0
    assert result.stdout == b""
    assert b"no sessions" in result.stderr
    assert json.loads(shmstream("ls", "--namespace", namespace, "--json").stdout) == []


def test_invalid_namespace_is_a_usage_error():
    result = shmstream("ls", "--namespace", "../etc")
    assert result.returncode == tools.EXIT_USAGE
    assert b"SHMSTREAM_NAMESPACE" not in result.stderr and b"--namespace='../etc'" in result.stderr


# --- dump ---------------------------------------------------------------------------------


def test_dump_raw_equals_the_sessions_bytes(store, namespace, tmp_path):
    _make(store, "a/b::m", EVENTS).close()
    with store.get("a/b::m") as session:
        expected = b"".join(session.read(0))
    result = shmstream("dump", "a/b::m", "--namespace", namespace)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    target = tmp_path / "out.sse"
    result = shmstream("dump", "a/b::m", "--namespace", namespace, "-o", str(target))
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == expected
    assert os.listdir(tmp_path) == ["out.sse"]  # no temporary file left


def test_dump_of_a_running_session_returns_what_is_there(store, namespace):
    session = _make(store, "live", [b"data: 1\n\n", b"data: 2\n\n"], state=None)
    try:
        result = shmstream("dump", "live", "--namespace", namespace)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"data: 1\n\ndata: 2\n\n"
        assert session.info().waiters == 0  # the dump never waited for more
    finally:
        session.close()


def _pattern(start: int, length: int) -> bytes:
    """The bytes a pattern producer writes at stream offsets [start, start + length)."""
    return bytes((start + n) % 251 for n in range(length))


class _PatternProducer:
    """A thread appending the offset pattern to a session until stopped."""

    def __init__(self, store: ShmStore, conversation_id: str):
        self.session = store.create_or_replace(conversation_id)
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.session.append(_pattern(self.total, 100))
            self.total += 100

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(RUN_TIMEOUT)
        self.session.finalize()
        self.session.close()


def _assert_consistent(snapshot) -> None:
    data, dropped, total = snapshot["data"], snapshot["dropped"], snapshot["total"]
    assert len(data) == total - dropped
    assert data == _pattern(dropped, len(data))


def test_dump_while_a_producer_laps_the_ring_is_consistent(namespace, tmp_path):
    producer = _PatternProducer(ShmStore(namespace, capacity=4096), "busy")
    try:
        _wait_for(lambda: producer.total > 3 * 4096, what="the ring to wrap")
        for attempt in range(3):
            snapshot = _snapshot(namespace, "busy", tmp_path / f"{attempt}.snap")
            assert snapshot["state"] == "running" and snapshot["dropped"] > 0
            _assert_consistent(snapshot)
    finally:
        producer.stop()


def test_take_snapshot_starts_over_when_lapped_between_chunks(namespace, monkeypatch):
    # Chunks smaller than the ring: the producer can drop bytes between two lock holds.
    # (take_snapshot lives in cli/snapshot.py: tools only re-exports CHUNK.)
    monkeypatch.setattr(snapshot_module, "CHUNK", 16)
    store = ShmStore(namespace, capacity=4096)
    producer = _PatternProducer(store, "busy")
    try:
        _wait_for(lambda: producer.total > 3 * 4096, what="the ring to wrap")
        with store.get("busy") as session:
            for _ in range(5):
                try:
                    snapshot = tools.take_snapshot(session)
                except tools.ToolError:  # lapped on every retry: allowed, never inconsistent
                    continue
                _assert_consistent(dataclasses.asdict(snapshot))
            assert session.info().waiters == 0
    finally:
        producer.stop()


def test_dump_sse_pretty_prints_events_with_offsets(store, namespace):
    _make(store, "pretty", EVENTS).close()
    result = shmstream("dump", "pretty", "--namespace", namespace, "--format", "sse")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("# session pretty: done, bytes [0, ")
    assert "[0] offset 0," in text
    assert f"[1] offset {len(EVENTS[0])}, 3 bytes" in text
    assert "(comment) (ping)" in text
    assert '"content": "Hel"' in text  # JSON data re-indented
    assert "data: [DONE]" in text


def test_dump_unknown_id_fails_with_a_message(namespace):
    result = shmstream("dump", "nope", "--namespace", namespace)
    assert result.returncode == 1
    assert b"no session with id nope" in result.stderr
    assert result.stdout == b""


# --- dump msgpack + load ------------------------------------------------------------------


def _snapshot(namespace: str, conversation_id: str, path) -> dict:
    result = shmstream("dump", conversation_id, "--namespace", namespace, "--format", "msgpack",
                       "-o", str(path))
    assert result.returncode == 0, result.stderr
    return msgpack.unpackb(path.read_bytes(), raw=False)


@pytest.mark.parametrize("capacity", [64 * 1024, 50], ids=["whole", "dropped"])
def test_dump_msgpack_then_load_replays_identically(namespace, other_namespace, tmp_path,
                                                    capacity):
    source = ShmStore(namespace, capacity=capacity)
    chunks = [f"data: {{\"n\": {n}}}\n\n".encode() for n in range(12)]
    _make(source, "conv::model", chunks, metadata={"model": "model"}).close()
    original = _snapshot(namespace, "conv::model", tmp_path / "a.snap")
    assert original["format"] == "shmstream-snapshot"
    if capacity == 50:
        assert original["dropped"] > 0

    result = shmstream("load", str(tmp_path / "a.snap"), "--namespace", other_namespace)
    assert result.returncode == 0, result.stderr
    restored = _snapshot(other_namespace, "conv::model", tmp_path / "b.snap")
    for field in ("conversation_id", "state", "total", "dropped", "capacity", "started_at_us",
                  "completed_at_us", "metadata", "data"):
        assert restored[field] == original[field], field

    # Every GET from=N answers the same: the same bytes, and the same OffsetLost below.
    target = ShmStore(other_namespace)
    with source.get("conv::model") as before, target.get("conv::model") as after:
        assert after.info().state is State.DONE
        for offset in range(original["dropped"], original["total"] + 1):
            assert b"".join(after.read(offset)) == b"".join(before.read(offset))
        if original["dropped"]:
            for session in (before, after):
                with pytest.raises(OffsetLost):
                    b"".join(session.read(original["dropped"] - 1))


def test_load_of_a_running_snapshot_is_aborted(store, namespace, other_namespace, tmp_path):
    session = _make(store, "half", [b"data: 1\n\n"], state=None)
    try:
        _snapshot(namespace, "half", tmp_path / "h.snap")
    finally:
        session.close()
    result = shmstream("load", str(tmp_path / "h.snap"), "--namespace", other_namespace)
    assert result.returncode == 0, result.stderr
    with ShmStore(other_namespace).get("half") as restored:
        info = restored.info()
        assert info.state is State.ABORTED and info.completed_at > 0
        assert b"".join(restored.read(0)) == b"data: 1\n\n"  # ends: no producer to wait for


def test_load_refuses_an_existing_id_unless_replace(store, namespace, tmp_path):
    _make(store, "same", [b"old"]).close()
    _snapshot(namespace, "same", tmp_path / "s.snap")
    result = shmstream("load", str(tmp_path / "s.snap"), "--namespace", namespace)
    assert result.returncode == 1
    assert b"exists" in result.stderr and b"--replace" in result.stderr
    result = shmstream("load", str(tmp_path / "s.snap"), "--namespace", namespace,
                       "--replace", "--id", "other")
    assert result.returncode == 0, result.stderr  # --id: a different id, so no clash
    with store.get("other") as copy:
        assert b"".join(copy.read(0)) == b"old"
        assert copy.info().metadata["id"] == "other"


def test_load_touch_restarts_the_ttl(store, namespace, other_namespace, tmp_path):
    _make(store, "old", [b"x"]).close()
    path = tmp_path / "o.snap"
    record = _snapshot(namespace, "old", path)
    record["completed_at_us"] -= 3600 * 10**6  # ended an hour ago
    path.write_bytes(msgpack.packb(record, use_bin_type=True))
    result = shmstream("load", str(path), "--namespace", other_namespace)
    assert result.returncode == 0 and b"--touch" in result.stderr  # warned: GC will take it
    result = shmstream("load", str(path), "--namespace", other_namespace, "--replace",
                       "--touch")
    assert result.returncode == 0 and b"--touch" not in result.stderr
    with ShmStore(other_namespace).get("old") as restored:
        assert time.time() - restored.info().completed_at < 60


def test_load_rejects_what_is_not_a_snapshot(namespace, tmp_path):
    for content in (b"not msgpack \xc1", msgpack.packb({"format": "other"}),
                    msgpack.packb({"format": "shmstream-snapshot", "version": 1, "total": 3})):
        path = tmp_path / "bad"
        path.write_bytes(content)
        result = shmstream("load", str(path), "--namespace", namespace)
        assert result.returncode == 1
        assert b"shmstream load:" in result.stderr and b"Traceback" not in result.stderr
    assert _leftovers(namespace) == []
    result = shmstream("load", str(tmp_path / "missing"), "--namespace", namespace)
    assert result.returncode == 1 and b"cannot read" in result.stderr


def test_load_reports_a_snapshot_that_does_not_fit(store, namespace, tmp_path):
    _make(store, "fits", [b"abc"]).close()
    path = tmp_path / "f.snap"
    record = _snapshot(namespace, "fits", path)
    store.evict("fits")
    for change, message in (({"capacity": 2}, b"do not fit"),
                            ({"dropped": 1, "total": 4}, b"full ring"),
                            ({"capacity": 1 << 50}, b"no room")):
        path.write_bytes(msgpack.packb({**record, **change}, use_bin_type=True))
        result = shmstream("load", str(path), "--namespace", namespace)
        assert result.returncode == 1, change
        assert message in result.stderr and b"Traceback" not in result.stderr
    assert shmstream("load", str(path), "--namespace", namespace, "--id", "").returncode == 1
    assert segment.list_names(namespace) == []


# --- tail ---------------------------------------------------------------------------------


class _Tail:
    """A running ``shmstream tail`` whose stdout is collected by a thread."""

    def __init__(self, *argv: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shmstream", "tail", *argv], env=_clean_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.output = bytearray()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            self.output += chunk

    def wait(self, timeout: float = RUN_TIMEOUT) -> tuple[int, bytes]:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout)
        return code, self.process.stderr.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(RUN_TIMEOUT)
        self.process.stdout.close()
        self.process.stderr.close()


def test_tail_follows_from_the_end_like_tail_f(store, namespace):
    session = _make(store, "live::m", [b"data: first\n\n"], state=None)
    follower = _Tail("live::m", "--namespace", namespace)
    try:
        _wait_for(lambda: session.info().waiters == 1, what="the tail to wait at the end")
        session.append(b"data: second\n\n")
        _wait_for(lambda: follower.output.endswith(b"second\n\n"), what="a live byte")
        session.append(b"data: [DONE]\n\n")
        session.finalize()
        code, stderr = follower.wait()
        assert code == 0, stderr
        assert bytes(follower.output) == b"data: second\n\ndata: [DONE]\n\n"  # no "first"
    finally:
        follower.kill()
        session.close()


def test_tail_from_0_replays_then_follows(store, namespace):
    session = _make(store, "live::m", [b"data: first\n\n"], state=None)
    follower = _Tail("live::m", "--namespace", namespace, "--from", "0")
    try:
        _wait_for(lambda: bytes(follower.output) == b"data: first\n\n", what="held bytes")
        session.append(b"data: second\n\n")
        session.finalize()
        code, stderr = follower.wait()
        assert code == 0, stderr
        assert bytes(follower.output) == b"data: first\n\ndata: second\n\n"
    finally:
        follower.kill()
        session.close()


def test_tail_from_an_offset(store, namespace):
    _make(store, "t", [b"0123456789"]).close()
    follower = _Tail("t", "--namespace", namespace, "--from", "4")
    try:
        code, stderr = follower.wait()
        assert code == 0, stderr
        assert bytes(follower.output) == b"456789"
    finally:
        follower.kill()


def test_tail_from_a_dropped_offset_fails(namespace):
    small = ShmStore(namespace, capacity=8)
    _make(small, "t", [b"0123456789"]).close()
    result = shmstream("tail", "t", "--namespace", namespace, "--from", "1")
    assert result.returncode == 1
    assert b"offset 1 is no longer held" in result.stderr
    result = shmstream("tail", "t", "--namespace", namespace, "--from", "2")
    assert result.returncode == 0 and result.stdout == b"23456789"
    result = shmstream("tail", "t", "--namespace", namespace)  # default: the end
    assert result.returncode == 0 and result.stdout == b""
    assert shmstream("tail", "t", "--namespace", namespace, "--from", "-1").returncode == 2


def test_tail_exits_cleanly_on_ctrl_c(store, namespace):
    session = _make(store, "quiet", [b"data: 1\n\n"], state=None)
    follower = _Tail("quiet", "--namespace", namespace, "--from", "0")
    try:
        _wait_for(lambda: session.info().waiters == 1, what="the tail to wait")
        follower.process.send_signal(signal.SIGINT)
        code, stderr = follower.wait(timeout=5)
        assert code == tools.EXIT_INTERRUPTED
        assert b"Traceback" not in stderr
        assert bytes(follower.output) == b"data: 1\n\n"
        assert session.info().waiters == 0  # it left the waiter count as it found it
        assert session.append(b"still fine")
    finally:
        follower.kill()
        session.close()


# --- gc / purge ---------------------------------------------------------------------------


def _dead_producer_session(namespace: str, conversation_id: str) -> None:
    code = ("import sys; from shmstream.shm.store import ShmStore; "
            "ShmStore(sys.argv[1]).create_or_replace(sys.argv[2]).append(b'x')")
    subprocess.run([sys.executable, "-c", code, namespace, conversation_id], check=True,
                   timeout=RUN_TIMEOUT)


def test_gc_dry_run_removes_nothing_and_gc_removes_expired(store, namespace):
    _make(store, "finished-1", [b"a"]).close()
    _make(store, "finished-2", [b"b"], state=State.FAILED).close()
    running = _make(store, "running", [b"c"], state=None)
    _dead_producer_session(namespace, "orphaned")
    try:
        names_before = sorted(_leftovers(namespace))
        result = shmstream("gc", "--namespace", namespace, "--ttl", "0", "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert sorted(plan["expire"]) == ["finished-1", "finished-2"]
        assert plan["abort"] == ["orphaned"]
        assert plan["keep"] == 1
        result = shmstream("gc", "--namespace", namespace, "--ttl", "0", "--dry-run")
        assert result.returncode == 0 and b"would expire 2, abort 1, keep 1" in result.stdout
        assert sorted(_leftovers(namespace)) == names_before
        assert store.get("orphaned").info().state is State.RUNNING

        # The configured TTL (300 s) keeps everything young.
        result = shmstream("gc", "--namespace", namespace, "--dry-run", "--json")
        assert json.loads(result.stdout)["expire"] == []

        result = shmstream("gc", "--namespace", namespace, "--json",
                           env=_clean_env(SHMSTREAM_TTL="0"))
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["expired"] == 2 and report["aborted"] == 1
        assert sorted(i.conversation_id for i in store.list()) == ["orphaned", "running"]
        assert store.get("orphaned").info().state is State.ABORTED
    finally:
        running.close()


def test_purge_yes_leaves_nothing(store, namespace):
    for n in range(3):
        _make(store, f"s{n}", [b"x"], state=None if n else State.DONE).close()
    result = shmstream("purge", "--namespace", namespace, "--yes")
    assert result.returncode == 0, result.stderr
    assert _leftovers(namespace) == []
    assert not os.path.exists(segment.registry_lock_path(namespace))


def test_purge_without_yes_and_without_a_tty_refuses(store, namespace):
    _make(store, "keep-me", [b"x"]).close()
    before = sorted(_leftovers(namespace))
    result = shmstream("purge", "--namespace", namespace)
    assert result.returncode == 1
    assert b"refusing" in result.stderr and b"--yes" in result.stderr
    assert sorted(_leftovers(namespace)) == before


def test_purge_needs_an_explicit_namespace(namespace):
    result = shmstream("purge", "--yes", env=_clean_env(SHMSTREAM_NAMESPACE=namespace))
    assert result.returncode == 2


@pytest.mark.parametrize("answer, purged", [(b"n\n", False), (b"y\n", True)])
def test_purge_asks_on_a_terminal(store, namespace, answer, purged):
    _make(store, "asked", [b"x"]).close()
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "shmstream", "purge", "--namespace", namespace],
            env=_clean_env(), stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        os.write(controller, answer)
        _, stderr = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        os.close(terminal)
        os.close(controller)
    assert b"[y/N]" in stderr
    assert process.returncode == (0 if purged else 1)
    assert (store.get("asked") is None) == purged


# --- pieces -------------------------------------------------------------------------------


def test_cli_dispatches_every_tool():
    parser = cli.build_parser()
    assert set(cli._TOOL_COMMANDS) == set(tools.COMMANDS)
    for command in tools.COMMANDS:
        argv = {"dump": ["x"], "tail": ["x"], "load": ["f"], "purge": ["--namespace", "n"]}
        assert parser.parse_args([command, *argv.get(command, [])]).command == command


def test_escape_makes_ids_terminal_safe():
    assert tools.escape("chat-1::llama/3 ok é") == "chat-1::llama/3 ok é"
    assert tools.escape("a\x1b[31m\n\\\u202e\U000e0001") == "a\\x1b[31m\\n\\\\\\u202e\\U000e0001"
    assert tools.shorten("x" * 50, 10) == "x" * 7 + "..."
    assert tools.show_id("x" * 50, None) == "x" * 50


def test_iter_events_marks_partial_and_incomplete_events():
    data = b"ta: 1\n\n:\r\n\r\nevent: e\ndata: 2\n\ndata: 3"
    events = list(tools.iter_events(data, 100))
    assert events == [
        (100, [b"ta: 1"], True),
        (107, [b":"], True),
        (112, [b"event: e", b"data: 2"], True),
        (130, [b"data: 3"], False),
    ]


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only_after_its_delay():
    now = [0.0]
    terminal = _FakeTerminal()
    progress = tools.Progress(terminal, delay=1.0, interval=0.0, clock=lambda: now[0])
    progress.phase("reading", 4 * 1024 * 1024)
    progress.update(1024)
    assert terminal.getvalue() == ""  # quick operations print nothing
    now[0] = 2.0
    progress.update(2 * 1024 * 1024)
    assert terminal.getvalue() == "\rreading: 2.0 MiB / 4.0 MiB (50%)"
    progress.finish()
    assert terminal.getvalue().endswith("\rreading: 4.0 MiB / 4.0 MiB (100%)\n")

    pipe = io.StringIO()
    quiet = tools.Progress(pipe, delay=0.0, interval=0.0)
    quiet.phase("reading", 10)
    quiet.update(5)
    quiet.finish()
    assert pipe.getvalue() == ""


def test_dump_shows_progress_on_a_terminal_stderr(namespace, tmp_path):
    big = ShmStore(namespace, capacity=8 * 1024 * 1024)
    _make(big, "big", [os.urandom(1024 * 1024) for _ in range(6)]).close()
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from shmstream.cli import main as cli, text; text.PROGRESS_DELAY = 0; "
             "sys.exit(cli.main())",
             "dump", "big", "--namespace", namespace, "-o", str(tmp_path / "big.raw")],
            env=_clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal,
        )
        process.wait(timeout=RUN_TIMEOUT)
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert process.returncode == 0
    assert b"\rreading: " in shown and b"writing: 6.0 MiB / 6.0 MiB (100%)" in shown
    assert (tmp_path / "big.raw").stat().st_size == 6 * 1024 * 1024


# --- the Redis backend --------------------------------------------------------------------


def test_ls_dump_tail_gc_work_on_redis_and_shm_only_tools_say_so(redis_stores, tmp_path):
    store = redis_stores(ttl=300)
    env = _clean_env(SHMSTREAM_BACKEND=redis_stores.url,
                     SHMSTREAM_NAMESPACE=redis_stores.namespace)
    done = _make(store, "chat-r::m", EVENTS, metadata={"model": "m"})
    running = _make(store, "chat-live", [b"data: 1\n\n"], state=None)
    try:
        result = shmstream("ls", env=env)
        assert result.returncode == 0, result.stderr
        assert b"chat-r::m" in result.stdout and b"chat-live" in result.stdout
        entries = {e["conversation_id"]: e for e in json.loads(shmstream("ls", "--json",
                                                                         env=env).stdout)}
        assert entries["chat-r::m"]["total_bytes"] == sum(map(len, EVENTS))
        assert entries["chat-live"]["state"] == "running"

        result = shmstream("dump", "chat-r::m", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"".join(EVENTS)
        result = shmstream("tail", "chat-r::m", "--from", "0", env=env)
        assert result.returncode == 0 and result.stdout == b"".join(EVENTS)

        result = shmstream("gc", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["expired"] == 0
        result = shmstream("gc", "--ttl", "0s", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert b"expires by its key's TTL" in result.stderr  # said plainly, not ignored

        for argv in (["load", str(tmp_path / "x")], ["gc", "--dry-run"],
                     ["purge", "--namespace", redis_stores.namespace, "--yes"]):
            result = shmstream(*argv, env=env)
            assert result.returncode == tools.EXIT_USAGE, argv
            assert b"shared-memory backend only" in result.stderr, argv
    finally:
        done.close()
        running.finalize()
        running.close()
