#!/usr/bin/env python3
"""CPU per SSE chunk in an upstream client, side by side in one run: httpx (the HTTP
workers' proxy) and aiohttp, each on asyncio's own loop and on uvloop, and the relays' own
client (shmstream/relay/h1client.py: httptools, each read pushed to a callback) on uvloop.

An asyncio SSE server sends ``--streams`` concurrent chunked streams of ``--events``
events, ``--gap`` seconds apart, so each read finds one event (a token stream's shape);
the client runs in a child process and reports its own CPU per event.

    .venv/bin/python scripts/bench_upstream_client.py
    .venv/bin/python scripts/bench_upstream_client.py --streams 50 --events 200
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource

import uvloop

EVENT = b'data: {"choices":[{"delta":{"content":" tok"}}]}\n\n'
CLIENTS = ("httpx:asyncio", "httpx:uvloop", "aiohttp:asyncio", "aiohttp:uvloop",
           "h1client:uvloop")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _client(kind: str, loop_kind: str, port: int, streams: int, results) -> None:
    async def one(client, url: str) -> int:
        count = 0
        if kind == "httpx":
            async with client.stream("POST", url, content=b"{}") as response:
                async for _ in response.aiter_raw():
                    count += 1
        else:
            async with client.post(url, data=b"{}") as response:
                async for _ in response.content.iter_any():
                    count += 1
        return count

    async def one_h1(upstream) -> int:
        from shmstream.relay.client import AsyncUpstreamRequest

        count = 0

        def on_chunk(_chunk: bytes) -> bool:
            nonlocal count
            count += 1
            return True
        response = await upstream.open(AsyncUpstreamRequest(
            "POST", "/v1/chat/completions", [], b"{}"))
        try:
            await response.pump(on_chunk, lambda: None)
        finally:
            await response.aclose()
        return count

    async def run() -> None:
        if kind == "h1client":
            from shmstream.relay.h1client import H1Upstream

            upstream = H1Upstream(f"http://127.0.0.1:{port}")
            started = _cpu()
            counts = await asyncio.gather(*(one_h1(upstream) for _ in range(streams)))
            results.put((sum(counts), _cpu() - started))
            await upstream.aclose()
            return
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        if kind == "httpx":
            import httpx

            client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))
        else:
            import aiohttp

            client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        started = _cpu()
        counts = await asyncio.gather(*(one(client, url) for _ in range(streams)))
        results.put((sum(counts), _cpu() - started))
        await (client.aclose() if kind == "httpx" else client.close())

    (uvloop.run if loop_kind == "uvloop" else asyncio.run)(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between events")
    args = parser.parse_args()
    chunk = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)

    async def handle(reader, writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for _ in range(args.events):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(args.gap)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
        context = multiprocessing.get_context("spawn")
        print(f"{args.streams} streams x {args.events} events, {args.gap * 1000:g} ms apart")
        print(f"{'client':18s} {'chunks read':>12s} {'CPU per event':>14s}")
        for spec in CLIENTS:
            kind, loop_kind = spec.split(":")
            results = context.Queue()
            child = context.Process(target=_client,
                                    args=(kind, loop_kind, port, args.streams, results))
            child.start()
            while child.is_alive():
                await asyncio.sleep(0.05)
            chunks, seconds = results.get()
            per_event = seconds / (args.streams * args.events) * 1e6
            print(f"{spec:18s} {chunks:>12,d} {per_event:>11.1f} us", flush=True)
        server.close()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
