"""Events from the training thread, published in the order they were reported.

The training loop (or the hosted poller) runs in a worker thread; its callbacks hand events to the
service's event loop, where one task publishes them one at a time, so progress, checkpoint and pause
events reach the stream in the order they happened. `close()` waits until every event is published
(a stage never acks its trigger before its events are on the bus, D4) and re-raises a publish error.
"""

from __future__ import annotations

import asyncio

from services.common.delivery import StageContext

_DONE = object()


class OrderedEmitter:
    def __init__(self, ctx: StageContext) -> None:
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while (item := await self._queue.get()) is not _DONE:
            payload, step = item
            await self._ctx.emit(payload, step=step)

    def emit(self, payload, step: str) -> None:
        """Thread-safe: queue an event for publication."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (payload, step))

    async def close(self) -> None:
        self._queue.put_nowait(_DONE)
        await self._task
