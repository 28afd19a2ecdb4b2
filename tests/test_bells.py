"""Coalesced rings from a relay to an HTTP worker's loop (relay/bells.py) over real unix
datagram sockets: one datagram per worker per loop pass, every ring delivered, nothing
lost when the worker's queue is full. tests/test_relay.py has the relay's streams ringing
through it."""

from __future__ import annotations

import asyncio
import socket

from shmstream.relay.bells import BellBox, BellRinger, bell_box


def test_the_rings_of_one_pass_go_out_as_one_datagram_and_reach_every_stream():
    async def go():
        box, ringer = bell_box(), BellRinger()
        rung: list[int] = []
        numbers = [box.register(lambda n=n: rung.append(n)) for n in range(300)]
        gone = box.register(lambda: rung.append(-1))
        box.unregister(gone)  # a stream that ended meanwhile: its ring is dropped
        for number in [*numbers, *numbers, gone]:  # twice each: coalesced to once
            ringer.ring(box.address, number)
        assert ringer.sent == 0  # nothing before the pass ends
        while len(rung) < len(numbers):
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        assert ringer.sent == 1
        assert sorted(rung) == list(range(300))  # each once, none for the gone stream
        assert bell_box() is box  # one box per loop
        ringer.close()
    asyncio.run(go())


def test_rings_a_full_queue_refused_are_sent_again():
    async def go():
        loop = asyncio.get_running_loop()
        box, ringer = BellBox(loop), BellRinger()
        rung: set[int] = set()
        numbers = [box.register(lambda n=n: rung.add(n)) for n in range(3000)]
        loop.remove_reader(box._socket.fileno())  # a worker too busy to read
        for number in numbers:
            ringer.ring(box.address, number)
            await asyncio.sleep(0)  # one pass each: one datagram each
        # The kernel queues a bounded number of datagrams (net.unix.max_dgram_qlen):
        # past it sendto says EAGAIN and the ringer keeps the numbers.
        assert ringer.sent < len(numbers)
        assert ringer._pending
        loop.add_reader(box._socket.fileno(), box._receive)
        while len(rung) < len(numbers):
            await asyncio.sleep(0.001)
        assert rung == set(range(len(numbers)))
        box.close()
        ringer.close()
    asyncio.run(go())


def test_a_worker_that_is_gone_costs_the_relay_nothing():
    async def go():
        ringer = BellRinger()
        gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        gone.bind("")
        address = gone.getsockname()
        gone.close()
        ringer.ring(address, 1)
        await asyncio.sleep(0.01)
        assert ringer.sent == 0 and not ringer._pending  # ECONNREFUSED: dropped
        ringer.close()
    asyncio.run(go())


def test_a_loop_without_a_bell_box_tries_once_and_warns_once(monkeypatch, caplog):
    def refused(self, loop):
        raise OSError("no abstract unix sockets here")

    monkeypatch.setattr(BellBox, "__init__", refused)

    async def go():
        return [bell_box() for _ in range(3)]

    assert asyncio.run(go()) == [None, None, None]  # the hand-off connection is rung
    assert sum("no bell box" in r.getMessage() for r in caplog.records) == 1
