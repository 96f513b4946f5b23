"""A batch puller for a JetStream durable pull consumer, for the recorder's throughput.

nats-py's `fetch()` spends a task and a timer per message (0.82 s for 20,000 messages here, against
0.22 s for the same messages read from a plain subscription). This speaks the pull protocol directly:
one `$JS.API.CONSUMER.MSG.NEXT` request per batch, answered into one inbox whose messages are queued
by a callback. Status messages (404 no messages, 408 request expired, 409 limits) end a round.

Every message that arrives in the inbox is handed out by some round, so an answer that arrives after
its round ended (a lingering request still delivering) is not lost: the next round takes it.
"""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client
from nats.aio.msg import Msg

_STATUS = "Status"


class BatchPuller:
    def __init__(self, nc: Client, stream: str, durable: str, *, batch: int, wait_s: float, linger_s: float = 0.005):
        self.nc = nc
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.batch = batch
        self.wait_s = wait_s
        self.linger_s = linger_s  # after the first message of a waiting request, how long to wait for more
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._inbox = nc.new_inbox()
        self._sub = None

    async def start(self) -> None:
        async def enqueue(msg: Msg) -> None:
            self._queue.put_nowait(msg)

        self._sub = await self.nc.subscribe(self._inbox, cb=enqueue, pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def stop(self) -> None:
        if self._sub is not None and not self.nc.is_closed:
            await self._sub.unsubscribe()

    async def _request(self, **body) -> None:
        await self.nc.publish(self.api, json.dumps({"batch": self.batch, **body}).encode(), reply=self._inbox)

    async def next_batch(self) -> list[Msg]:
        """Up to `batch` messages: what is available now, else what arrives within wait_s (maybe none)."""
        batch = self._take_queued()
        if len(batch) < self.batch:
            await self._request(no_wait=True)
            batch += await self._read_round(self.batch - len(batch), first_timeout=self.wait_s)
        if batch:
            return batch
        # Nothing available: a waiting request, answered as soon as one message arrives.
        await self._request(expires=int(self.wait_s * 1e9))
        return await self._read_round(self.batch, first_timeout=self.wait_s + 1.0, linger=True)

    def _take_queued(self) -> list[Msg]:
        out = []
        while len(out) < self.batch and not self._queue.empty():
            msg = self._queue.get_nowait()
            if not _is_status(msg):
                out.append(msg)
        return out

    async def _read_round(self, limit: int, *, first_timeout: float, linger: bool = False) -> list[Msg]:
        out: list[Msg] = []
        timeout = first_timeout
        while len(out) < limit:
            try:
                msg = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                break
            if _is_status(msg):
                break
            out.append(msg)
            if linger:
                timeout = self.linger_s
            # Drain what is already queued without a timer per message.
            while len(out) < limit and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if _is_status(nxt):
                    return out
                out.append(nxt)
        return out


def _is_status(msg: Msg) -> bool:
    return bool(msg.headers) and _STATUS in msg.headers and not msg.reply
