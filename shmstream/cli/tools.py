"""The operator's session tools: ``shmstream ls | dump | load | tail | gc | purge``.

``ls``, ``dump``, ``tail`` and ``gc`` go through the store interface
(:class:`~shmstream.store.interface.SessionStore`: ``list``, ``get``, ``read``, ``gc``), so
they work on the configured backend (``SHMSTREAM_BACKEND``: shared memory or Redis).
``load``, ``purge`` and ``gc --dry-run`` work on shared memory only and say so. On shared
memory they read segments through :mod:`shmstream.shm.store` and the layout accessors;
nothing here computes an offset into a segment. They work while a server runs (each read
holds a segment's lock for one bounded chunk) and after it stopped.

Ids are capabilities and never appear in the service's logs, but these tools are for the
operator of the host, who can read the store anyway: they show ids, escaped (an id is
arbitrary text, control characters included) and shortened in tables.

Exit codes: 0 success, 1 failure (unknown id, refused, bad snapshot), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from shmstream import metrics
from shmstream.backends import open_store
from shmstream.cli.follow import tail
from shmstream.cli.snapshot import (  # noqa: F401 - re-exported for tests and scripts
    CHUNK,
    Snapshot,
    SnapshotError,
    iter_events,
    render_sse,
    session_fields,
    take_snapshot,
)
from shmstream.cli.text import (  # noqa: F401 - re-exported for tests and scripts
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Progress,
    ToolError,
    escape,
    format_duration,
    format_size,
    isatty,
    say,
    shorten,
    show_id,
)
from shmstream.config import SettingError, Settings, redact_url
from shmstream.store.errors import InvalidConversationId, ShmstreamError
from shmstream.store.interface import Session, SessionInfo, SessionStore, now_us
from shmstream.store.states import State

DUMP_RETRIES = 5  # a producer that laps a follower this often is writing faster than we read

# --- the store ----------------------------------------------------------------------------


def _settings(args, **overrides) -> Settings:
    flags = {"namespace": getattr(args, "namespace", None), **overrides}
    try:
        return Settings.load(os.environ, flags)
    except SettingError as exc:
        raise ToolError(str(exc), EXIT_USAGE) from None


def _store(args, ttl: str | None = None) -> SessionStore:
    """The configured backend's store, for the namespace of ``--namespace``."""
    settings = _settings(args, ttl=ttl)
    try:
        return open_store(settings)
    except ValueError as exc:
        raise ToolError(str(exc), EXIT_USAGE) from None


def _shm_store(args, command: str, ttl: str | None = None):
    """The shared-memory store; a plain refusal on another backend."""
    settings = _settings(args, ttl=ttl)
    if settings.backend != "shm":
        raise ToolError(f"{command} works on the shared-memory backend only, and "
                        f"SHMSTREAM_BACKEND is {redact_url(settings.backend)}", EXIT_USAGE)
    from shmstream.shm.store import ShmStore

    return ShmStore(settings.namespace, capacity=settings.max_bytes, ttl=settings.ttl)


def _namespace_of(store: SessionStore) -> str:
    return getattr(store, "namespace", "?")


def _lookup(store: SessionStore, conversation_id: str) -> Session | None:
    try:
        return store.get(conversation_id)
    except InvalidConversationId as exc:
        raise ToolError(f"invalid id: {exc.message}") from None


def _get(store: SessionStore, conversation_id: str) -> Session:
    session = _lookup(store, conversation_id)
    if session is None:
        raise ToolError(f"no session with id {show_id(conversation_id, None)} in namespace "
                        f"{_namespace_of(store)}")
    return session


# --- ls -----------------------------------------------------------------------------------


def info_entry(info: SessionInfo, namespace: str, now: float) -> dict:
    """One session as a JSON-ready dict (``ls --json``)."""
    return {
        "conversation_id": info.conversation_id,
        "state": info.state.label,
        "total_bytes": info.total_bytes,
        "dropped_bytes": info.dropped_bytes,
        "held_bytes": info.total_bytes - info.dropped_bytes,
        "allocated_bytes": info.allocated_bytes,
        "capacity": info.capacity,
        "started_at": info.started_at,
        "completed_at": info.completed_at,
        "age_seconds": round(now - info.started_at, 3),
        "producer_pid": info.producer_pid,
        "producer_alive": info.producer_alive if info.state is State.RUNNING else None,
        "waiting_readers": info.waiters,
        "metadata": info.metadata,
    }


def _json_default(value):
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max([len(h), *(len(r[c]) for r in rows)]) for c, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            cell.rjust(widths[c]) if c in right else cell.ljust(widths[c])
            for c, cell in enumerate(cells)
        ).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _producer(info: SessionInfo) -> str:
    """The PRODUCER column: true for every state (a finished session has none running)."""
    if info.state is not State.RUNNING:
        return "finished"
    if not info.producer_pid:
        return "alive" if info.producer_alive else "gone"
    return f"{'alive' if info.producer_alive else 'gone'} (pid {info.producer_pid})"


def ls(args) -> int:
    store = _store(args)
    namespace = _namespace_of(store)
    infos = sorted(store.list(), key=lambda info: (info.started_at, info.conversation_id))
    now = time.time()
    if args.json:
        entries = [info_entry(info, namespace, now) for info in infos]
        if store.__class__.__name__ == "ShmStore":
            from shmstream.shm import segment

            for entry in entries:
                entry["segment"] = segment.segment_name(namespace, entry["conversation_id"])
        print(json.dumps(entries, indent=2, default=_json_default))
        return EXIT_OK
    if not infos:
        say(f"no sessions in namespace {namespace}")
        return EXIT_OK
    headers = ["ID", "STATE", "HELD", "ALLOCATED", "TOTAL", "AGE", "ENDED", "PRODUCER",
               "WAITING"]
    rows = []
    for info in infos:
        rows.append([
            show_id(info.conversation_id),
            info.state.label,
            format_size(info.total_bytes - info.dropped_bytes),
            format_size(info.allocated_bytes) if info.allocated_bytes else "-",
            str(info.total_bytes),
            format_duration(now - info.started_at),
            format_duration(now - info.completed_at) + " ago" if info.is_done else "-",
            _producer(info),
            str(info.waiters),
        ])
    print(_table(headers, rows, right={2, 3, 4, 5, 8}))
    return EXIT_OK


# --- snapshots (dump / load) --------------------------------------------------------------


# --- output -------------------------------------------------------------------------------


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[BinaryIO]:
    """stdout for None or ``-``; else a file that appears complete or not at all."""
    if path in (None, "-"):
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".shmstream-dump-", dir=directory)
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _write(out: BinaryIO, payload: bytes, progress: Progress) -> None:
    progress.phase("writing", len(payload))
    view = memoryview(payload)
    for start in range(0, len(payload), CHUNK):
        out.write(view[start : start + CHUNK])
        progress.update(min(start + CHUNK, len(payload)))


def _progress_for(output: str | None) -> Progress:
    # On the terminal that also shows the dumped bytes, a progress line would mix with them.
    to_terminal = output in (None, "-") and isatty(sys.stdout)
    return Progress(enabled=isatty(sys.stderr) and not to_terminal)


def dump(args) -> int:
    if args.format == "msgpack" and args.output in (None, "-") and isatty(sys.stdout):
        raise ToolError("refusing to write a binary snapshot to a terminal: use -o FILE or "
                        "redirect stdout")
    store = _store(args)
    session = _get(store, args.id)
    progress = _progress_for(args.output)
    try:
        snapshot = take_snapshot(session, progress)
    finally:
        session.close()
    if args.format == "raw":
        payload = snapshot.data
    elif args.format == "msgpack":
        payload = snapshot.to_msgpack()
    else:
        payload = "".join(line + "\n" for line in render_sse(snapshot)).encode(
            "utf-8", "backslashreplace")
    with _output(args.output) as out:
        _write(out, payload, progress)
    progress.finish()
    return EXIT_OK


def _read_input(path: str, progress: Progress) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            progress.phase("reading", size)
            data = bytearray()
            while chunk := source.read(CHUNK):
                data += chunk
                progress.update(len(data))
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from None
    return bytes(data)


def load(args) -> int:
    store = _shm_store(args, "load")
    progress = Progress()
    snapshot = Snapshot.from_msgpack(_read_input(args.file, progress))
    conversation_id = args.id if args.id is not None else snapshot.conversation_id
    if not args.replace:
        existing = _lookup(store, conversation_id)
        if existing is not None:
            existing.close()
            raise ToolError(f"a session with id {show_id(conversation_id, None)} exists in "
                            f"namespace {store.namespace}: pass --replace to overwrite it")
    # A snapshot of a running session restores as aborted: its producer is not coming back.
    state = snapshot.state if snapshot.state.is_terminal else State.ABORTED
    completed_at_us = snapshot.completed_at_us or snapshot.taken_at_us
    if args.touch:
        completed_at_us = now_us()
    progress.phase("restoring", len(snapshot.data))
    try:
        session = store.restore(
            conversation_id, snapshot.data, total=snapshot.total, state=state,
            started_at_us=snapshot.started_at_us, completed_at_us=completed_at_us,
            metadata=snapshot.metadata, capacity=snapshot.capacity,
        )
    except ValueError as exc:
        raise SnapshotError(f"cannot restore the snapshot: {exc}") from None
    except ShmstreamError as exc:  # no room in /dev/shm, a quota, an invalid --id
        raise ToolError(f"cannot restore the snapshot: {exc.message}") from None
    session.close()
    progress.finish(len(snapshot.data))
    say(f"restored {show_id(conversation_id)} into namespace {store.namespace}: "
         f"{state.label}, bytes [{snapshot.dropped}, {snapshot.total})")
    if completed_at_us / 1e6 <= time.time() - store.ttl:
        say(f"note: it ended more than the TTL ({store.ttl:g} s) ago, so the next GC pass "
             f"removes it; load with --touch to restart its TTL")
    return EXIT_OK


# --- gc / purge ---------------------------------------------------------------------------


@dataclass
class GCPlan:
    """What one GC pass would do, from listed infos (``gc --dry-run``)."""

    expire: list[SessionInfo]
    abort: list[SessionInfo]
    keep: list[SessionInfo]
    unreadable: int  # segments list() skipped: gc removes the unfinished ones
    orphan_semaphores: int


def plan_gc(infos: list[SessionInfo], ttl: float, now: float) -> GCPlan:
    """The rule of :meth:`ShmStore.gc` (its ``_collect``), applied without changing anything:
    a running session whose producer is dead is aborted (and expires a TTL later); a finished
    one whose end is at least ``ttl`` old is removed."""
    cutoff_us = int((now - ttl) * 1e6)
    plan = GCPlan([], [], [], 0, 0)
    for info in infos:
        if info.state is State.RUNNING and not info.producer_alive:
            plan.abort.append(info)
        elif info.state.is_terminal and round(info.completed_at * 1e6) <= cutoff_us:
            plan.expire.append(info)
        else:
            plan.keep.append(info)
    return plan


def gc(args) -> int:
    if args.dry_run:
        return _gc_dry_run(_shm_store(args, "gc --dry-run", ttl=args.ttl), args)
    store = _store(args, ttl=args.ttl)
    if args.ttl is not None and store.__class__.__name__ != "ShmStore":
        say("note: on this backend a finished session expires by its key's TTL, set when "
            "it finished; --ttl changes nothing")
    report = store.gc()
    counts = dataclasses.asdict(report)
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"expired {report.expired}, aborted {report.aborted}, locks recovered "
                  f"{report.locks_recovered}, debris removed {report.corrupt_removed}, kept "
                  f"{report.kept} (namespace {_namespace_of(store)}, ttl {store.ttl:g} s)")
        return EXIT_OK


def _gc_dry_run(store, args) -> int:
    from shmstream.shm import segment

    names = segment.list_names(store.namespace)
    infos = store.list()
    plan = plan_gc(infos, store.ttl, time.time())
    plan.unreadable = len(names) - len(infos)
    plan.orphan_semaphores = len(segment.list_orphan_semaphores(store.namespace))
    if args.json:
        print(json.dumps({
            "dry_run": True,
            "expire": [info.conversation_id for info in plan.expire],
            "abort": [info.conversation_id for info in plan.abort],
            "keep": len(plan.keep),
            "unreadable": plan.unreadable,
            "orphan_semaphores": plan.orphan_semaphores,
        }))
        return EXIT_OK
    print(f"dry run (namespace {store.namespace}, ttl {store.ttl:g} s): would expire "
          f"{len(plan.expire)}, abort {len(plan.abort)}, keep {len(plan.keep)}; unreadable "
          f"segments {plan.unreadable}, orphan semaphores {plan.orphan_semaphores}")
    now = time.time()
    for info in plan.expire:
        print(f"  expire  {show_id(info.conversation_id)}  {info.state.label}, ended "
              f"{format_duration(now - info.completed_at)} ago")
    for info in plan.abort:
        print(f"  abort   {show_id(info.conversation_id)}  producer pid {info.producer_pid} "
              f"is gone")
    return EXIT_OK


def purge(args) -> int:
    store = _shm_store(args, "purge")
    namespace = store.namespace
    from shmstream.serve.namespace_lock import holder_pid
    from shmstream.shm import segment

    holder = holder_pid(namespace)
    if holder is not None:
        raise ToolError(f"namespace {namespace} is in use by a running service (pid "
                        f"{holder or '?'}): stop it before purging")
    segments = segment.list_names(namespace)
    orphans = segment.list_orphan_semaphores(namespace)
    if not args.yes:
        if not isatty(sys.stdin):
            raise ToolError(f"refusing to purge namespace {namespace} without confirmation: "
                            f"stdin is not a terminal (pass --yes)")
        running = sum(1 for info in store.list()
                      if info.state is State.RUNNING and info.producer_alive)
        sys.stderr.write(
            f"Remove {len(segments)} sessions ({running} running) and "
            f"{len(segments) + len(orphans)} semaphores of namespace {namespace}? [y/N] "
        )
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            say("not purged")
            return EXIT_FAILURE
    removed = store.purge()
    # The service's Prometheus files live beside the segments (shmstream.metrics).
    metrics.remove_directory(namespace)
    print(f"purged namespace {namespace}: removed {removed} segments and orphan semaphores")
    return EXIT_OK


# --- entry --------------------------------------------------------------------------------

COMMANDS: dict[str, Callable] = {
    "ls": ls, "dump": dump, "load": load, "tail": tail, "gc": gc, "purge": purge,
}


def run(args) -> int:
    """Run the tool named ``args.command``; errors become one line on stderr and an exit code."""
    if not args.verbose:
        logging.getLogger("shmstream").setLevel(logging.WARNING)
    with contextlib.suppress(AttributeError, ValueError):  # not a TextIOWrapper
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return COMMANDS[args.command](args)
    except ToolError as exc:
        say(f"shmstream {args.command}: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        say(f"shmstream {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read our stdout left (`| head`): stop quietly, and keep the interpreter's
        # final flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
