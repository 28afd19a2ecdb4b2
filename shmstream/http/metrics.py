"""``GET /metrics``: Prometheus text format, rendered in a thread (a scrape reads every
process's metric files and lists the store, milliseconds the event loop must not block
for). It needs the API key when one is set."""

from __future__ import annotations

import asyncio

import falcon

from shmstream import metrics


class MetricsResource:
    def __init__(self, store):
        self.store = store

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data, resp.content_type = await asyncio.to_thread(metrics.render, self.store)

    on_head = on_get
