"""The floor of an HTTP worker hop, for ``bench_scale.py --phases floor``: a bare Falcon ASGI
app under gunicorn's asgi worker (as shmstream's workers run) that streams the bench's SSE
answers from a per-process tick, with no store, relay or hand-off. Its CPU per event is what
the chosen stack costs before shmstream does anything:

    cd scripts && ../.venv/bin/gunicorn -k asgi -w 4 -b 127.0.0.1:PORT floor_app:app
"""

from __future__ import annotations

import asyncio
import json

import falcon.asgi


class _Tick:
    """One timer per process wakes every open stream, as the bench upstream's ticker does."""

    def __init__(self):
        self._next: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    async def wait(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._next = loop.create_future()
            self._task = loop.create_task(self._run(interval))
        await self._next

    async def _run(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            due, self._next = self._next, loop.create_future()
            due.set_result(None)


_tick = _Tick()


class Completions:
    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        plan = json.loads(await req.stream.read())["bench"]
        pad = "x" * plan["pad"]

        async def events():
            for index in range(plan["events"]):
                await _tick.wait(plan["interval"])
                yield (f'data: {{"i":{index},"tag":"{plan["tag"]}","pad":"{pad}"}}\n\n'
                       .encode())
            yield b"data: [DONE]\n\n"

        resp.content_type = "text/event-stream"
        resp.stream = events()


app = falcon.asgi.App()
app.add_route("/v1/chat/completions", Completions())
