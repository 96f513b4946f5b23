"""Audit service: the recorder (bus -> run_events) and the projectors (run_events -> the timeline and History).

One audit process is the active recorder, any others are standbys: the active one holds a PostgreSQL
advisory lock, a standby waits for it and takes over when the active one's connection ends
(services/audit/lease.py)."""

from __future__ import annotations

import asyncio
import os

import asyncpg
from nats.js.api import AckPolicy

from contracts import subjects
from services.audit.db import app_pool
from services.audit.lease import LeaseLost, RecorderLease
from services.audit.migrate import migrate
from services.audit.projections import history, timeline
from services.audit.pull import RawBatchPuller
from services.audit.recorder import CONSUMER, Recorder
from services.audit.settings import AuditSettings
from services.common.app import Service, consumer_config
from services.common.logging import get_logger

log = get_logger(__name__)


class AuditService(Service):
    def __init__(self, settings: AuditSettings):
        super().__init__("audit", settings)
        if not settings.database_url:
            raise SystemExit("DATABASE_URL is required by the audit service")
        self.settings: AuditSettings = settings
        self.pool: asyncpg.Pool | None = None
        self.recorder: Recorder | None = None
        self.lease: RecorderLease | None = None
        self._wake = asyncio.Event()
        self._projector: asyncio.Task | None = None
        self._recording: asyncio.Task | None = None
        self._stopping = False
        # The recorder's ack floor (every position up to it committed and acked) and the messages
        # committed above it, not yet acked (see _ack_contiguous).
        self._acked = 0
        self._unacked: dict[int, object] = {}
        self.app.on_shutdown(self._shutdown)

    async def _record_forever(self) -> None:
        """Pull batches from the recorder's durable consumer, record each in one transaction, ack.

        Its own pull loop rather than a FastStream batch subscriber: FastStream 0.7.8 refills a
        batch with ever-shorter fetch deadlines, which leaves orphaned pull requests on the server;
        they capture messages that then wait out ack_wait and arrive out of order (seen here: a
        position recorded 30 s after later ones). See services/audit/pull.py for why not fetch(), and why
        the recorder pulls over a connection of its own.
        """
        # Ack-all: a batch commits as one transaction, so one ack settles it (and every position below;
        # never past one not committed yet: _ack_contiguous).
        config = consumer_config(self.settings)
        config.durable_name = CONSUMER
        config.filter_subject = f"{subjects.ROOT}.>"
        config.ack_policy = AckPolicy.ALL
        config.max_ack_pending = self.settings.recorder_batch * 4
        info = await self.js.add_consumer(subjects.STREAM, config)
        self._acked = info.ack_floor.stream_seq if info.ack_floor else 0
        self.recorder.settled_up_to(self._acked)  # the hash chain waits for no position at or below it
        puller = RawBatchPuller(self.settings.nats_url, subjects.STREAM, CONSUMER, batch=self.settings.recorder_batch,
                                wait_s=self.settings.recorder_fetch_timeout_s, options=self.settings.nats_options)
        await puller.start()
        try:
            await self.record_from(puller)
        finally:
            await puller.stop()

    async def record_from(self, puller: RawBatchPuller) -> None:
        """Pull and decode the next batch while the previous one commits; commits stay in order.

        With ack-all, acking a batch settles every earlier message too, so a batch that fails to
        commit is retried in place (its messages kept alive with in_progress) and nothing after it
        is acked meanwhile: a failure can delay recording, never skip it.
        """
        committing: asyncio.Task | None = None
        try:
            while not self._stopping:  # as well as cancellation: see _project_forever
                try:
                    msgs = await puller.next_batch()
                except Exception as exc:  # noqa: BLE001 - a connection error: pull again shortly
                    log.warning("recorder_pull_failed", error=repr(exc), exc_info=exc)
                    await asyncio.sleep(1.0)
                    continue
                if committing is not None and committing.done():
                    await committing  # raises LeaseLost: another recorder is active now
                    committing = None
                if not msgs:
                    continue
                batch = self.recorder.prepare(msgs)
                if committing is not None:
                    await committing
                committing = asyncio.create_task(self._commit_until_done(batch))
        finally:
            if committing is not None:
                committing.cancel()

    async def _commit_until_done(self, batch) -> None:
        delay = 0.5
        while True:
            try:
                outcome = await self.recorder.commit(batch)
                break
            except LeaseLost:
                raise  # not to retry: this process must stop recording (the service exits, _worker_stopped)
            except Exception as exc:  # noqa: BLE001 - nothing was acked: keep the batch and retry
                log.error("recorder_batch_failed", error=repr(exc), batch=len(batch.msgs), retry_in_s=delay,
                          exc_info=exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                for m in batch.msgs:
                    await m.in_progress()
        await self._ack_contiguous(batch)
        log.debug("recorded", **outcome.__dict__)
        self._wake.set()

    async def _ack_contiguous(self, batch) -> None:
        """Ack (ack-all) up to the highest position below which every position is committed, not past
        a hole: an ack settles every earlier message, and one missing from what this process committed
        may be in the hands of a recorder that died (or in a batch still unsettled), to be redelivered
        when its ack_wait ends. Acking past it would settle it unrecorded: a gap for good. Committed
        messages above a hole wait for it (or come again and commit as already recorded)."""
        for m, position in zip(batch.msgs, batch.positions):
            if position > self._acked:
                self._unacked[position] = m  # a redelivery replaces the earlier delivery
        top = self._acked
        while top + 1 in self._unacked:
            top += 1
        if top == self._acked:
            if self._unacked:
                log.info("recorder_ack_waits_for_hole", acked=self._acked, first_missing=self._acked + 1,
                         committed_above=len(self._unacked))
            return
        await self._unacked[top].ack()
        for position in range(self._acked + 1, top + 1):
            del self._unacked[position]
        self._acked = top

    async def prepare_broker(self) -> None:
        await self.connect()
        self.start_workers()

    async def connect(self) -> None:
        """Migrate, open the pool, connect to NATS; the workers start separately."""
        await migrate(self.settings.database_url)
        self.pool = await app_pool(self.settings.database_url, min_size=1, max_size=4)
        self.lease = RecorderLease(self.settings.database_url)
        self.recorder = Recorder(self.pool, None, lease=self.lease)  # js set below once connected
        await super().prepare_broker()
        self.recorder.js = self.js

    def start_workers(self, *, projector: bool = True) -> None:
        """Start the recorder and the projector once this process holds the recorder lease (a standby waits
        for it first). bench/recorder.py times the recorder alone: projector=False."""
        self._recording = asyncio.create_task(self._lead(projector), name="recorder")
        self._recording.add_done_callback(self._worker_stopped)

    async def _lead(self, projector: bool) -> None:
        await self.lease.acquire()  # a standby until the active recorder's connection ends
        if projector:
            self._projector = asyncio.create_task(self._project_forever(), name="projector")
        await self._record_forever()

    async def _project_forever(self) -> None:
        """Keep the timeline caught up; stop only on a projection error (D8), which is recorded with
        its position; a lost connection is retried on a fresh one.

        The loops also end on `_stopping`: asyncio.wait_for on Python 3.11 swallows a cancellation
        that arrives as the awaited event fires (a commit's wake-up at shutdown), and a projector
        that went on would hold its pooled connection, and pool.close() would wait for it forever."""
        stopped: set[str] = set()  # projections stopped on an error (recorded); the others go on
        while not self._stopping:
            try:
                async with self.pool.acquire() as conn:
                    while not self._stopping:
                        self._wake.clear()  # before catching up: a commit during catch_up wakes the next round
                        for projection in (timeline, history):
                            if projection.NAME in stopped:
                                continue
                            try:
                                await projection.catch_up(conn, self.settings.projector_batch)
                            except timeline.ProjectionError:
                                stopped.add(projection.NAME)  # recorded in projection_checkpoints
                        if len(stopped) == 2:
                            return  # the recorder goes on
                        try:
                            await asyncio.wait_for(self._wake.wait(), self.settings.projector_poll_s)
                        except TimeoutError:
                            pass
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
                log.warning("projector_reconnecting", error=repr(exc))
                await asyncio.sleep(1.0)

    def _worker_stopped(self, task: asyncio.Task) -> None:
        """The recorder never ends on its own: if it does, say why and exit, so the service shows as
        down (`tuneline status`, a container restart) instead of silently recording nothing."""
        if task.cancelled() or self._stopping:
            return
        log.critical("worker_stopped", worker=task.get_name(), error=repr(task.exception()),
                     exc_info=task.exception())
        os._exit(70)

    async def _shutdown(self) -> None:
        self._stopping = True
        tasks = [task for task in (self._recording, self._projector) if task]
        for task in tasks:
            task.cancel()
        if tasks:  # let them unwind (the recorder closes its NATS connection) before the pool closes
            await asyncio.wait(tasks, timeout=5.0)
        if self._projector is not None and self._projector not in tasks:  # started while the others unwound
            self._projector.cancel()
            await asyncio.wait([self._projector], timeout=5.0)
        if self.lease is not None:
            await self.lease.release()  # a standby takes over at once
        if self.pool:
            try:  # close() waits for every connection to be released: not forever
                await asyncio.wait_for(self.pool.close(), 10.0)
            except TimeoutError:
                self.pool.terminate()


def main() -> None:
    AuditService(AuditSettings()).run()
