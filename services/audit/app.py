"""Audit service: the recorder (bus -> run_events) and the timeline projector (run_events -> views)."""

from __future__ import annotations

import asyncio

import asyncpg
from faststream.middlewares import AckPolicy
from faststream.nats import NatsMessage, PullSub

from contracts import subjects
from services.audit.db import app_pool
from services.audit.migrate import migrate
from services.audit.projections import timeline
from services.audit.recorder import CONSUMER, Recorder
from services.audit.settings import AuditSettings
from services.common.app import RUN_EVENTS, Service, consumer_config
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
        self._wake = asyncio.Event()
        self._projector: asyncio.Task | None = None
        self.app.on_shutdown(self._shutdown)

        @self.broker.subscriber(
            f"{subjects.ROOT}.>",
            stream=RUN_EVENTS,
            durable=CONSUMER,
            pull_sub=PullSub(batch_size=settings.recorder_batch, timeout=settings.recorder_fetch_timeout_s, batch=True),
            ack_policy=AckPolicy.MANUAL,
            config=consumer_config(settings),
            title=CONSUMER,
        )
        async def on_batch(msg: NatsMessage) -> None:
            raws = msg.raw_message
            try:
                outcome = await self.recorder.record(raws)
            except (asyncpg.PostgresError, OSError) as exc:
                # The database is the problem, not the messages: retry them all later.
                log.warning("recorder_batch_retry", error=repr(exc), batch=len(raws))
                for m in raws:
                    await m.nak(delay=2.0)
                return
            for m in raws:
                await m.ack()
            log.debug("recorded", **outcome.__dict__)
            self._wake.set()

    async def prepare_broker(self) -> None:
        await migrate(self.settings.database_url)
        self.pool = await app_pool(self.settings.database_url, min_size=1, max_size=4)
        self.recorder = Recorder(self.pool, None)  # js set below once connected
        await super().prepare_broker()
        self.recorder.js = self.js
        self._projector = asyncio.create_task(self._project_forever())

    async def _project_forever(self) -> None:
        async with self.pool.acquire() as conn:
            while True:
                try:
                    await timeline.catch_up(conn, self.settings.projector_batch)
                except timeline.ProjectionError:
                    return  # stopped on an error, recorded in projection_checkpoints; recorder goes on
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.projector_poll_s)
                except TimeoutError:
                    pass

    async def _shutdown(self) -> None:
        if self._projector:
            self._projector.cancel()
        if self.pool:
            await self.pool.close()


def main() -> None:
    AuditService(AuditSettings()).run()
