"""Rings from relay processes to HTTP workers, coalesced: one datagram per worker per loop
pass, not one write per append per stream.

A reader that started an answer waits on its producer's rings (relay/handoff.py). Ringing
each stream's own hand-off connection cost the relay one ``write`` per append (28% of its
CPU at 1,000 streams: the kernel wakes the worker's loop for every byte) and the worker one
``read`` per append. Here each HTTP worker's event loop owns one unbound unix datagram
socket (an abstract address the kernel picks, so nothing is left in the file system); a
submit names it and the stream's number in it, and the relay collects the numbers of the
streams it appended to during one pass of its loop and sends each worker one datagram
of them:

    datagram := u32 stream number (little-endian), repeated

The hand-off connection stays open beside it: its end (the relay closes it after the
session's end, or the relay died) is what tells the reader to poll a last time or to fall
back to the store's wake-up, so a ring is only ever a hint to poll, never a state. A lost,
late or foreign datagram therefore costs a poll at most (any local process can send to an
abstract address; all it can do is that). Unix datagrams are not dropped by the kernel: a
full queue refuses with EAGAIN and the relay sends the numbers again on its next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import weakref
from collections.abc import Callable

log = logging.getLogger("shmstream.relay.bells")

NUMBER = struct.Struct("<I")
BATCH = 1024  # numbers per datagram (4 KiB, far below a unix socket's datagram limit)
RETRY = 0.002  # seconds before numbers a full queue refused are sent again
_RECV_SIZE = BATCH * NUMBER.size


class BellBox:
    """This event loop's mailbox for rings (the HTTP worker's side): one datagram socket,
    and the streams waiting on it by number. Use :func:`bell_box`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._socket.bind("")  # Linux autobind: a fresh abstract address, nothing on disk
        self.address: bytes = self._socket.getsockname()
        self._loop = loop
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0
        loop.add_reader(self._socket.fileno(), self._receive)

    def register(self, ring: Callable[[], None]) -> int:
        """A number for a stream whose rings call ``ring`` (on this loop)."""
        self._next = number = (self._next + 1) & 0xFFFFFFFF
        self._callbacks[number] = ring
        return number

    def unregister(self, number: int) -> None:
        self._callbacks.pop(number, None)

    def _receive(self) -> None:
        callbacks = self._callbacks
        while True:
            try:
                data = self._socket.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.exception("bell box: receive failed")
                return
            for (number,) in NUMBER.iter_unpack(data[: len(data) & ~3]):
                ring = callbacks.get(number)
                if ring is not None:
                    ring()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._socket.fileno())
        self._socket.close()


_boxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bell_box() -> BellBox | None:
    """The running loop's :class:`BellBox`, made on first use; None where one cannot be
    made (no abstract unix sockets: the hand-off connection is rung instead). A loop
    tries once: the warning is not repeated for every request."""
    loop = asyncio.get_running_loop()
    if loop in _boxes:
        return _boxes[loop]
    try:
        box = BellBox(loop)
    except (OSError, NotImplementedError) as exc:
        log.warning("no bell box (%s): relays ring each hand-off connection instead", exc)
        box = None
    else:
        weakref.finalize(loop, box._socket.close)
    _boxes[loop] = box
    return box


class BellRinger:
    """The relay's side: :meth:`ring` notes a stream's number for its worker; the numbers
    noted during one pass of the loop go out together, one datagram per worker."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._pending: dict[bytes, set[int]] = {}
        self._scheduled = False
        self.sent = 0  # datagrams sent (tests, benchmarks)

    def ring(self, address: bytes, number: int) -> None:
        numbers = self._pending.get(address)
        if numbers is None:
            numbers = self._pending[address] = set()
        numbers.add(number)
        if not self._scheduled:
            self._scheduled = True
            # After the callbacks of this pass: every append they make joins this send.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for address, numbers in pending.items():
            ordered = list(numbers)
            for start in range(0, len(ordered), BATCH):
                batch = ordered[start:start + BATCH]
                try:
                    self._socket.sendto(struct.pack(f"<{len(batch)}I", *batch), address)
                    self.sent += 1
                except (BlockingIOError, InterruptedError):
                    self._pending[address] = set(ordered[start:])  # refused: next pass
                    break
                except OSError:
                    break  # the worker is gone (ECONNREFUSED, ENOENT): so are its readers
        if self._pending:
            self._scheduled = True
            asyncio.get_running_loop().call_later(RETRY, self._flush)

    def close(self) -> None:
        self._socket.close()
