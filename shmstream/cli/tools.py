"""The operator's segment tools: ``shmstream ls | dump | load | tail | gc | purge``.

Like Aeron's ``LogInspector``, they read segments only through :mod:`shmstream.shm.store`
(which maps them) and the :class:`~shmstream.shm.layout.Header` accessors (which know where every
field lives); nothing here computes an offset into a segment. They work while a server runs
(each read holds a segment's lock for one bounded chunk) and after it stopped.

Ids are capabilities and never appear in the service's logs, but these tools are for the
operator of the host, who can read /dev/shm anyway: they show ids, escaped (an id is arbitrary
text, control characters included) and shortened in tables.

Exit codes: 0 success, 1 failure (unknown id, refused, bad snapshot), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO

import msgpack

from shmstream import metrics
from shmstream.config import Settings
from shmstream.shm import segment
from shmstream.shm.store import ShmSession, ShmStore
from shmstream.store.errors import InvalidConversationId, OffsetLost, ShmstreamError
from shmstream.store.interface import SessionInfo, now_us
from shmstream.store.states import State

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

CHUNK = 1024 * 1024  # bytes copied per lock hold while dumping, and per write
SNAPSHOT_FORMAT = "shmstream-snapshot"
SNAPSHOT_VERSION = 1
ID_COLUMN_WIDTH = 40
PROGRESS_DELAY = 0.5  # seconds before a progress line appears (quick operations show none)
DUMP_RETRIES = 5  # a producer that laps the dump this often is writing faster than we read

# Header fields a snapshot records, each read through the layout accessor of that name.
HEADER_FIELDS = (
    "state", "flags", "total", "dropped", "capacity", "started_at_us", "completed_at_us",
    "producer_pid", "producer_start",
)


class ToolError(Exception):
    """A failure to report as one line on stderr, ending the command with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


# --- text for humans ----------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """``text`` safe for a terminal: backslash escapes for every non-printable character
    (controls, bidi overrides, separators other than the space) and for the backslash."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the cut marked by ``...``."""
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def show_id(conversation_id: str, width: int | None = ID_COLUMN_WIDTH) -> str:
    shown = escape(conversation_id)
    return shown if width is None else shorten(shown, width)


def format_size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``12s``, ``3m05s``, ``2h03m``, ``4d07h``; negative (clock steps) shows as ``0s``."""
    whole = max(int(seconds), 0)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A one-line, carriage-return progress report on a terminal, for long transfers.

    Silent unless ``stream`` is a terminal, and until the operation has run for ``delay``
    seconds, so quick ones and pipelines print nothing. Redraws at most every ``interval``.
    """

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool | None = None,
                 delay: float | None = None, interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.delay = PROGRESS_DELAY if delay is None else delay
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.label = ""
        self.total = 0
        self.shown = False
        self._drawn_at = float("-inf")
        self._width = 0

    def phase(self, label: str, total: int) -> None:
        """Start counting ``total`` bytes of a step called ``label`` (same line)."""
        self.label = label
        self.total = total
        self.update(0)

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and (now - self.started < self.delay or now - self._drawn_at < self.interval):
            return
        percent = 100 * done // self.total if self.total else 100
        line = f"{self.label}: {format_size(done)} / {format_size(self.total)} ({percent}%)"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(line))
        self._drawn_at = now
        self.shown = True

    def finish(self, done: int | None = None) -> None:
        """Draw the final count and end the line, if anything was drawn."""
        if self.shown:
            self.update(self.total if done is None else done, force=True)
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


# --- the store ----------------------------------------------------------------------------


def _settings(args) -> Settings:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        raise ToolError(str(exc), EXIT_USAGE) from None
    namespace = getattr(args, "namespace", None) or settings.namespace
    try:
        segment.validate_namespace(namespace)
    except ValueError as exc:
        raise ToolError(str(exc), EXIT_USAGE) from None
    return dataclasses.replace(settings, namespace=namespace)


def _store(args, ttl: float | None = None) -> ShmStore:
    settings = _settings(args)
    return ShmStore(settings.namespace, capacity=settings.max_bytes,
                    ttl=settings.ttl if ttl is None else ttl)


def _lookup(store: ShmStore, conversation_id: str) -> ShmSession | None:
    try:
        return store.get(conversation_id)
    except InvalidConversationId as exc:
        raise ToolError(f"invalid id: {exc.message}") from None


def _get(store: ShmStore, conversation_id: str) -> ShmSession:
    session = _lookup(store, conversation_id)
    if session is None:
        raise ToolError(f"no session with id {show_id(conversation_id, None)} in namespace "
                        f"{store.namespace}")
    return session


# --- ls -----------------------------------------------------------------------------------


def info_entry(info: SessionInfo, namespace: str, now: float) -> dict:
    """One session as a JSON-ready dict (``ls --json``)."""
    return {
        "conversation_id": info.conversation_id,
        "segment": segment.segment_name(namespace, info.conversation_id),
        "state": info.state.label,
        "total_bytes": info.total_bytes,
        "dropped_bytes": info.dropped_bytes,
        "capacity": info.capacity,
        "started_at": info.started_at,
        "completed_at": info.completed_at,
        "age_seconds": round(now - info.started_at, 3),
        "producer_pid": info.producer_pid,
        "producer_alive": info.producer_alive,
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


def ls(args) -> int:
    store = _store(args)
    infos = sorted(store.list(), key=lambda info: (info.started_at, info.conversation_id))
    now = time.time()
    if args.json:
        entries = [info_entry(info, store.namespace, now) for info in infos]
        print(json.dumps(entries, indent=2, default=_json_default))
        return EXIT_OK
    if not infos:
        _say(f"no sessions in namespace {store.namespace}")
        return EXIT_OK
    headers = ["ID", "STATE", "TOTAL", "DROPPED", "AGE", "ENDED", "PID", "ALIVE", "WAITING"]
    rows = []
    for info in infos:
        rows.append([
            show_id(info.conversation_id),
            info.state.label,
            str(info.total_bytes),
            str(info.dropped_bytes),
            format_duration(now - info.started_at),
            format_duration(now - info.completed_at) + " ago" if info.is_done else "-",
            str(info.producer_pid) if info.producer_pid else "-",
            ("yes" if info.producer_alive else "no") if info.producer_pid else "-",
            str(info.waiters),
        ])
    print(_table(headers, rows, right={2, 3, 4, 6, 8}))
    return EXIT_OK


# --- snapshots (dump / load) --------------------------------------------------------------


class SnapshotError(ToolError):
    """The file is not a snapshot this version can load."""


@dataclass
class Snapshot:
    """A session's header fields, metadata and held bytes ``[dropped, total)``."""

    conversation_id: str
    state: State
    flags: int
    total: int
    dropped: int
    capacity: int
    started_at_us: int
    completed_at_us: int
    producer_pid: int
    producer_start: int
    metadata: dict
    data: bytes
    taken_at_us: int

    def to_msgpack(self) -> bytes:
        record = dataclasses.asdict(self)
        record["state"] = self.state.label
        return msgpack.packb(
            {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, **record},
            use_bin_type=True,
        )

    @classmethod
    def from_msgpack(cls, raw: bytes) -> Snapshot:
        """Raises :class:`SnapshotError` naming what is wrong."""
        try:
            record = msgpack.unpackb(raw, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise SnapshotError(f"not a shmstream snapshot (not msgpack: {exc})") from None
        if not isinstance(record, dict) or record.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError("not a shmstream snapshot (no format marker)")
        if record.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"snapshot version {record.get('version')!r} is not "
                                f"{SNAPSHOT_VERSION}")
        values = {}
        for spec in dataclasses.fields(cls):
            value = record.get(spec.name)
            expected = {"conversation_id": str, "metadata": dict, "data": bytes,
                        "state": str}.get(spec.name, int)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise SnapshotError(f"snapshot field {spec.name!r} is missing or not "
                                    f"{expected.__name__}")
            values[spec.name] = value
        try:
            values["state"] = State[values["state"].upper()]
        except KeyError:
            raise SnapshotError(f"snapshot state {values['state']!r} is unknown") from None
        snapshot = cls(**values)
        if snapshot.total - snapshot.dropped != len(snapshot.data) or snapshot.dropped < 0:
            raise SnapshotError(f"snapshot holds {len(snapshot.data)} bytes, but its offsets "
                                f"say [{snapshot.dropped}, {snapshot.total})")
        return snapshot


def _header_fields(session: ShmSession) -> dict:
    """The header fields, read through the layout accessors under the segment's lock."""
    header = session.segment.header
    with session.segment.lock:
        return {name: getattr(header, name) for name in HEADER_FIELDS}


def take_snapshot(session: ShmSession, progress: Progress | None = None) -> Snapshot:
    """The session's fields and held bytes, consistent with each other.

    The bytes are copied a chunk per lock hold, so a running producer is never stalled for
    long; if it laps the copy (drops bytes not yet copied), the copy starts over from a
    fresh header. Raises :class:`ToolError` if that keeps happening.
    """
    metadata = session.segment.header.metadata()
    for _ in range(DUMP_RETRIES):
        fields = _header_fields(session)
        try:
            held = _copy(session, fields["dropped"], fields["total"], progress)
        except OffsetLost:
            continue
        return Snapshot(conversation_id=session.conversation_id, metadata=metadata,
                        data=held, taken_at_us=now_us(), **fields)
    raise ToolError("the producer keeps overwriting the ring faster than it can be copied")


def _copy(session: ShmSession, start: int, end: int, progress: Progress | None) -> bytes:
    """The stream bytes ``[start, end)``, which must all have been appended already.

    Stops at ``end``: it never reads ring bytes past it and never waits for more. Raises
    :class:`OffsetLost` if the producer dropped some before they were copied.
    """
    wanted = end - start
    if progress is not None:
        progress.phase("reading", wanted)
    held = bytearray()
    for chunk in session.read(start, limit=CHUNK, should_stop=lambda: len(held) >= wanted):
        held.extend(chunk[: wanted - len(held)])
        if progress is not None:
            progress.update(len(held))
    return bytes(held)


# --- SSE rendering --------------------------------------------------------------------------

_LINE = re.compile(rb"([^\r\n]*)(\r\n|\n|\r)")


def iter_events(data: bytes, first_offset: int = 0) -> Iterator[tuple[int, list[bytes], bool]]:
    """SSE events in ``data``: (stream offset of the event, its lines, complete?).

    An event ends at a blank line; a last event with no blank line yet is incomplete.
    """
    lines: list[bytes] = []
    start = 0
    position = 0
    for match in _LINE.finditer(data):
        if match.start() != position:
            break
        position = match.end()
        if match.group(1):
            if not lines:
                start = match.start()
            lines.append(match.group(1))
        elif lines:
            yield first_offset + start, lines, True
            lines = []
    tail = data[position:]
    if tail:
        if not lines:
            start = position
        lines.append(tail)
    if lines:
        yield first_offset + start, lines, False


def _render_field(line: bytes) -> list[str]:
    text = line.decode("utf-8", "backslashreplace")
    if text.startswith(":"):
        return [f"  (comment) {escape(text[1:].strip()) or '(ping)'}"]
    name, colon, value = text.partition(":")
    if not colon:
        return [f"  {escape(name)}"]
    value = value.removeprefix(" ")
    if name == "data" and value[:1] in ("{", "["):
        try:
            parsed = json.loads(value)
        except ValueError:
            pass
        else:
            pretty = json.dumps(parsed, indent=2, ensure_ascii=False).splitlines()
            return [f"  data: {escape(pretty[0])}", *(f"    {escape(p)}" for p in pretty[1:])]
    return [f"  {escape(name)}: {escape(value)}"]


def render_sse(snapshot: Snapshot) -> Iterator[str]:
    """Human-readable lines: a summary, then every event with its offset and fields."""
    yield (f"# session {show_id(snapshot.conversation_id, None)}: {snapshot.state.label}, "
           f"bytes [{snapshot.dropped}, {snapshot.total}) of {snapshot.total}")
    events = list(iter_events(snapshot.data, snapshot.dropped))
    for number, (offset, lines, complete) in enumerate(events):
        notes = []
        if number == 0 and snapshot.dropped > 0:
            notes.append("may start before the oldest held byte")
        if not complete:
            notes.append("incomplete")
        size = (events[number + 1][0] if number + 1 < len(events) else snapshot.total) - offset
        suffix = f" ({', '.join(notes)})" if notes else ""
        yield f"\n[{number}] offset {offset}, {size} bytes{suffix}"
        for line in lines:
            yield from _render_field(line)


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
    to_terminal = output in (None, "-") and _isatty(sys.stdout)
    return Progress(enabled=_isatty(sys.stderr) and not to_terminal)


def dump(args) -> int:
    if args.format == "msgpack" and args.output in (None, "-") and _isatty(sys.stdout):
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
    store = _store(args)
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
    _say(f"restored {show_id(conversation_id)} into namespace {store.namespace}: "
         f"{state.label}, bytes [{snapshot.dropped}, {snapshot.total})")
    if completed_at_us / 1e6 <= time.time() - store.ttl:
        _say(f"note: it ended more than the TTL ({store.ttl:g} s) ago, so the next GC pass "
             f"removes it; load with --touch to restart its TTL")
    return EXIT_OK


# --- tail ---------------------------------------------------------------------------------


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the reader loop checks (a blocked futex wait returns
    on the signal), so the reader leaves its waiter count and lock consistent."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def is_set(self) -> bool:
        return self.received is not None

    def __enter__(self) -> _StopSignals:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def tail(args) -> int:
    if args.from_offset is not None and args.from_offset < 0:
        raise ToolError(f"--from must be a non-negative offset, not {args.from_offset}",
                        EXIT_USAGE)
    store = _store(args)
    session = _get(store, args.id)
    try:
        with _StopSignals() as stop:
            offset = _follow(session, args.from_offset, stop.is_set, sys.stdout.buffer)
            if stop.is_set():
                return EXIT_INTERRUPTED
        if _isatty(sys.stderr):
            _say(f"-- session ended: {_header_fields(session)['state'].label} at offset "
                 f"{offset}")
        return EXIT_OK
    finally:
        session.close()


def _follow(session: ShmSession, start: int | None, should_stop: Callable[[], bool],
            out: BinaryIO) -> int:
    """Copy the session's bytes from ``start`` (None: the oldest held byte) to ``out`` as
    they arrive, until it ends or ``should_stop()``; return the offset reached.

    Raises :class:`ToolError` when the bytes at the offset are gone: asked for with
    ``start``, or dropped by a producer that lapped this reader.
    """
    offset = 0 if start is None else start
    for _ in range(DUMP_RETRIES):
        if start is None:  # again if the producer dropped it before the first read
            offset = _header_fields(session)["dropped"]
        first = offset
        try:
            for chunk in session.read(offset, should_stop=should_stop):
                out.write(chunk)
                out.flush()
                offset += len(chunk)
            return offset
        except OffsetLost:
            if start is not None or offset != first:
                break
    dropped = _header_fields(session)["dropped"]
    raise ToolError(f"offset {offset} is no longer held (the oldest held byte is {dropped})")


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
    store = _store(args, ttl=args.ttl)
    if not args.dry_run:
        report = store.gc()
        counts = dataclasses.asdict(report)
        if args.json:
            print(json.dumps(counts))
        else:
            print(f"expired {report.expired}, aborted {report.aborted}, locks recovered "
                  f"{report.locks_recovered}, debris removed {report.corrupt_removed}, kept "
                  f"{report.kept} (namespace {store.namespace}, ttl {store.ttl:g} s)")
        return EXIT_OK
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
    namespace = args.namespace
    try:
        store = ShmStore(namespace)
    except ValueError as exc:
        raise ToolError(str(exc), EXIT_USAGE) from None
    segments = segment.list_names(namespace)
    orphans = segment.list_orphan_semaphores(namespace)
    if not args.yes:
        if not _isatty(sys.stdin):
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
            _say("not purged")
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
        _say(f"shmstream {args.command}: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say(f"shmstream {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read our stdout left (`| head`): stop quietly, and keep the interpreter's
        # final flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
