"""The frames between an HTTP worker and a relay process, over a unix stream socket.

One connection per completion request (a connect costs tens of microseconds, and a
connection that belongs to one request makes "the caller went away" a plain EOF that the
relay may ignore). A frame is a 4-byte big-endian length and a msgpack map with an ``op``:

    worker -> relay   {"op": "submit", "conversation_id", "method", "target",
                       "headers": [[name, value], ...], "body": <bin>, "metadata": {...},
                       "bell": <bin>, "bell_number"}   (both optional: relay/bells.py)
    relay -> worker   {"op": "created", "token"}            the session exists
                      {"op": "refused", "status", "type", "error", "message"}
                      {"op": "answer", "status", "headers", "body": <bin> | None}

After an answer with ``body`` None (a stream) the connection is the reader's doorbell, no
frames: the relay rings after each append, and closes the connection after the end; the
worker sends nothing. With a ``bell`` in the submit the rings go there as the stream's
``bell_number`` (relay/bells.py: one datagram per relay pass for all of a worker's
streams); without one the relay writes one byte ``!`` here (none while its earlier ones
sit unread in the socket buffer).

Nothing here knows sessions or HTTP; :mod:`shmstream.relay.handoff` (worker side) and
:mod:`shmstream.relay.server` (relay side) give the frames their meaning.
"""

from __future__ import annotations

import struct

import msgpack

MAX_FRAME = 80 * 1024 * 1024  # a completion body may be up to 64 MiB (images)
_LENGTH = struct.Struct(">I")


class FrameError(Exception):
    """A frame that is too large or not a msgpack map with an ``op``."""


def encode(message: dict) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(payload)) + payload


def take_frame(buffer: bytearray) -> dict | None:
    """The first message of ``buffer`` (removed from it), or None if it holds no whole
    frame yet. Raises FrameError for a frame that is too large or malformed."""
    if len(buffer) < _LENGTH.size:
        return None
    end = _LENGTH.size + _frame_size(buffer)
    if len(buffer) < end:
        return None
    message = decode(buffer[_LENGTH.size : end])
    del buffer[:end]
    return message


def _frame_size(head) -> int:
    (size,) = _LENGTH.unpack_from(head)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return size


def decode(payload: bytes | bytearray) -> dict:
    """A frame's message. Raises FrameError unless it is a msgpack map with an ``op``."""
    try:
        message = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise FrameError(f"undecodable frame: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise FrameError("a frame must be a map with an 'op'")
    return message
