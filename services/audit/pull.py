"""The recorder's batch puller: a JetStream durable pull consumer read over a NATS connection of its own,
with nats-py's per-message work cut to what the recorder uses.

Why not nats-py's `fetch()`: it spends a task and a timer per message (0.82 s for 20,000 messages
here, against 0.22 s read from a plain subscription). And why not a plain subscription speaking the
same pull protocol (an earlier version of this module): for every message nats-py parses the header block into a dict, builds a Msg, queues it for the subscription's task,
which calls the callback, which queues it again for the puller. The recorder reads none of the
headers (the stream sequence is in the reply subject, the event id in the body). Here the
connection's message hook hands the messages of the puller's inbox straight to the puller: one Msg
each (so acks, in_progress and dead_letter() work unchanged), no headers, no intermediate queue.
Pulling 20,000 messages took 0.29 s of CPU the other way and takes 0.13 s this way: the saving is
about a fifth of all the CPU the audit service spends on them.

That hook is nats-py's `Client._process_msg(sid, subject, reply, data, headers)`, called by its
protocol parser for every MSG/HMSG; the subscription id is `Subscription._id`. Both are private;
`_check_hook()` refuses to start on a nats-py whose hook has another shape rather than misread
messages, and tests/connected/test_recorder_pull.py runs this against a real server.

Protocol: one `$JS.API.CONSUMER.MSG.NEXT` request per batch, answered into one
inbox. A status message (404 no messages, 408 request expired, 409 limits) has no reply subject —
every JetStream message has one ($JS.ACK...) — and ends a round. Every message that reaches the
inbox is handed out by some round, in arrival order, so an answer that arrives after its round ended
(a lingering request still delivering) is not lost: the next round takes it. (Asking for the next
batch as soon as one is in, so that the server sends it while this one commits, measured no faster
here, and was dropped.)
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import deque

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common.logging import get_logger

log = get_logger(__name__)

_STATUS = None  # queued for a status message: the end of a round


class _Connection(Client):
    """A nats-py client whose one raw subscription bypasses the per-message machinery."""

    raw_sid: int | None = None
    raw_sink = None  # called with (subject, reply, data) for each message of raw_sid

    async def _process_msg(self, sid, subject, reply, data, headers):  # noqa: ANN001 - nats-py's signature
        if sid == self.raw_sid:
            self.raw_sink(subject, reply, data)
            return
        await super()._process_msg(sid, subject, reply, data, headers)


def _check_hook() -> None:
    params = list(inspect.signature(Client._process_msg).parameters)
    if params != ["self", "sid", "subject", "reply", "data", "headers"]:
        raise RuntimeError(f"nats-py's Client._process_msg{tuple(params)} is not the hook this puller expects")


class RawBatchPuller:
    def __init__(self, servers: str, stream: str, durable: str, *, batch: int, wait_s: float,
                 linger_s: float = 0.005, name: str = "tuneline-audit-recorder", options: dict | None = None):
        _check_hook()
        self.servers = servers
        self.options = dict(options or {})  # credentials (ServiceSettings.nats_options)
        self.name = name
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.batch = batch
        self.wait_s = wait_s
        self.linger_s = linger_s  # after the first message of a waiting request, how long to wait for more
        self.nc = _Connection()
        self._queue: deque[Msg | None] = deque()
        self._arrived = asyncio.Event()
        self._inbox = ""

    async def start(self) -> None:
        async def error_cb(exc: Exception) -> None:
            log.warning("recorder_nats_error", error=repr(exc))

        # Reconnect forever: a closed connection would leave the recorder pulling nothing.
        await self.nc.connect(self.servers, name=self.name, max_reconnect_attempts=-1, error_cb=error_cb,
                              **self.options)
        self._inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(self._inbox)  # no callback: _process_msg hands its messages over
        self.nc.raw_sink = self._deliver
        self.nc.raw_sid = sub._id

    async def stop(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()

    def _deliver(self, subject: bytes, reply: bytes, data: bytes) -> None:
        # Never raise: this runs in nats-py's read loop, which ends for good on an exception, and the
        # recorder would pull nothing more. A subject is any bytes a publisher sent (not UTF-8 at all):
        # replaced characters keep it storable, and the message is recorded or dead-lettered as usual.
        nc = self.nc
        self._queue.append(Msg(nc, subject.decode(errors="replace"), reply.decode(errors="replace"), data)
                           if reply else _STATUS)
        self._arrived.set()

    async def _request(self, n: int, **body) -> None:
        await self.nc.publish(self.api, json.dumps({"batch": n, **body}).encode(), reply=self._inbox)

    async def next_batch(self) -> list[Msg]:
        """Up to `batch` messages: what is available now, else what arrives within wait_s (maybe none)."""
        batch = self._take_queued(self.batch)
        if len(batch) < self.batch:
            await self._request(self.batch - len(batch), no_wait=True)
            batch += await self._read_round(self.batch - len(batch), first_timeout=self.wait_s)
        if batch:
            return batch
        # Nothing available: a waiting request, answered as soon as one message arrives.
        await self._request(self.batch, expires=int(self.wait_s * 1e9))
        return await self._read_round(self.batch, first_timeout=self.wait_s + 1.0, linger=True)

    def _take_queued(self, limit: int) -> list[Msg]:
        """Messages already queued, skipping status messages (those of rounds already over)."""
        out: list[Msg] = []
        queue = self._queue
        while queue and len(out) < limit:
            msg = queue.popleft()
            if msg is not _STATUS:
                out.append(msg)
        return out

    async def _read_round(self, limit: int, *, first_timeout: float, linger: bool = False) -> list[Msg]:
        """Messages of the current round until `limit`, a status message, or a quiet `timeout`."""
        out: list[Msg] = []
        queue = self._queue
        timeout = first_timeout
        while len(out) < limit:
            if not queue:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout)
                except TimeoutError:
                    break
            while queue and len(out) < limit:
                msg = queue.popleft()
                if msg is _STATUS:
                    return out
                out.append(msg)
            if linger and out:
                timeout = self.linger_s
        return out
