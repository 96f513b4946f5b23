"""Builds a service: a FastStream NATS app whose every subscriber follows the delivery policy."""

from __future__ import annotations

import logging

from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage, PullSub
from nats.js import JetStreamContext

from contracts import subjects
from services.common.artifacts import ArtifactStore
from services.common.bus import declare_streams
from services.common.delivery import ConsumerSpec, Handler, handle_delivery
from services.common.logging import configure_logging, get_logger
from services.common.settings import ServiceSettings

log = get_logger(__name__)

RUN_EVENTS = JStream(subjects.STREAM, declare=False)


def consumer_config(settings: ServiceSettings) -> ConsumerConfig:
    return ConsumerConfig(max_deliver=settings.max_deliver, ack_wait=settings.ack_wait_s)


class Service:
    """A service process: one broker, its consumers, its artifact store, its JetStream context."""

    def __init__(self, name: str, settings: ServiceSettings):
        self.name = name
        self.settings = settings
        configure_logging(name, settings.log_level)
        # FastStream logs through structlog too (JSON, with the ids bound per message); its
        # per-message "Received/Processed" lines are DEBUG: our handlers log what they did.
        self.broker = NatsBroker(settings.nats_url, name=f"tuneline-{name}", logger=get_logger("faststream"),
                                 log_level=logging.DEBUG)
        self.artifacts = ArtifactStore(settings.artifact_root)
        self._js: JetStreamContext | None = None
        self._startup_hooks: list = []
        self.app = FastStream(self.broker, after_startup=[self._after_startup])

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.broker._connection.jetstream()  # the broker's own connection
        return self._js

    async def _after_startup(self) -> None:
        log.info("service_started", nats_url=self.settings.nats_url)

    def consume(self, spec: ConsumerSpec, handler: Handler) -> None:
        @self.broker.subscriber(
            spec.subject,
            stream=RUN_EVENTS,
            durable=spec.durable,
            # One long fetch at a time: short fetch deadlines leave orphaned pull requests (see audit app).
            pull_sub=PullSub(batch_size=1, timeout=5.0),
            ack_policy=AckPolicy.MANUAL,  # FastStream's default would terminate on any exception
            config=consumer_config(self.settings),
            title=spec.durable,
        )
        async def on_message(msg: NatsMessage) -> None:
            await handle_delivery(msg.raw_message, spec, handler, self.js, self.artifacts, self.settings)

    def on_startup(self, hook) -> None:
        """Run `await hook(self)` once connected and declared, before any consumer takes a message."""
        self._startup_hooks.append(hook)

    async def prepare_broker(self) -> None:
        """Connect and declare streams before subscribers start (they need the stream to exist)."""
        await self.broker.connect()
        await declare_streams(self.js)
        for hook in self._startup_hooks:
            await hook(self)

    def run(self) -> None:
        import asyncio

        async def main() -> None:
            await self.prepare_broker()
            await self.app.run()

        asyncio.run(main())
