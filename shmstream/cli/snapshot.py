"""Snapshots of a session (``dump``, ``load``) and their readable SSE rendering.

A snapshot is taken through the store interface (:meth:`Session.info` and
:meth:`Session.read`), so it works on every backend; only restoring one (``load``) needs the
shared-memory store.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from shmstream.cli.text import Progress, ToolError, escape, show_id
from shmstream.store.errors import OffsetLost
from shmstream.store.interface import Session, SessionInfo, now_us
from shmstream.store.states import State

CHUNK = 1024 * 1024  # bytes copied per read while dumping, and per write
SNAPSHOT_FORMAT = "shmstream-snapshot"
SNAPSHOT_VERSION = 1
DUMP_RETRIES = 5  # a producer that laps the dump this often is writing faster than we read


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


def session_fields(info: SessionInfo) -> dict:
    """The snapshot's header fields of a session, from one consistent :class:`SessionInfo`
    (a backend without flags or a producer start time records 0)."""
    return {
        "state": info.state, "flags": getattr(info, "flags", 0), "total": info.total_bytes,
        "dropped": info.dropped_bytes, "capacity": info.capacity,
        "started_at_us": round(info.started_at * 1e6),
        "completed_at_us": round(info.completed_at * 1e6),
        "producer_pid": info.producer_pid, "producer_start": 0, "metadata": info.metadata,
    }


def take_snapshot(session: Session, progress: Progress | None = None) -> Snapshot:
    """The session's fields and held bytes, consistent with each other.

    The header and the first chunk come from one :meth:`Session.read_held` (one lock hold
    on shared memory), so a ring of up to ``CHUNK`` bytes is copied whole however fast its
    producer laps it. A bigger ring is copied on a chunk per read, so a running producer
    is never stalled for long; if it laps the copy (drops bytes not yet copied), the copy
    starts over from a fresh header. Raises :class:`ToolError` if that keeps happening.
    """
    for _ in range(DUMP_RETRIES):
        try:
            info, first = session.read_held(CHUNK)
            fields = session_fields(info)
            held = _copy(session, first, fields["dropped"], fields["total"], progress)
        except OffsetLost:
            continue
        return Snapshot(conversation_id=session.conversation_id, data=held,
                        taken_at_us=now_us(), **fields)
    raise ToolError("the producer keeps overwriting the ring faster than it can be copied")


def _copy(session: Session, first: bytes, start: int, end: int,
          progress: Progress | None) -> bytes:
    """The stream bytes ``[start, end)``, which must all have been appended already;
    ``first`` holds the first of them, copied already.

    Stops at ``end``: it never reads ring bytes past it and never waits for more. Raises
    :class:`OffsetLost` if the producer dropped some before they were copied.
    """
    wanted = end - start
    if progress is not None:
        progress.phase("reading", wanted)
    held = bytearray(first[:wanted])
    if progress is not None:
        progress.update(len(held))
    if len(held) >= wanted:
        return bytes(held)
    for chunk in session.read(start + len(held), limit=CHUNK,
                              should_stop=lambda: len(held) >= wanted):
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
