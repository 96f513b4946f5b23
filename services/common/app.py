"""Builds a service: a FastStream NATS app whose every subscriber follows the delivery policy."""

from __future__ import annotations

import logging

from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage, NatsUserPassword, PullSub
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from contracts import subjects
from services.common.artifacts import ArtifactStore
from services.common.bus import declare_streams
from services.common.delivery import ConsumerSpec, Handler, Replay, handle_delivery
from services.common.logging import configure_logging, get_logger
from services.common.settings import ServiceSettings

log = get_logger(__name__)

RUN_EVENTS = JStream(subjects.STREAM, declare=False)


def consumer_config(settings: ServiceSettings) -> ConsumerConfig:
    """Durable consumers redeliver without limit (max_deliver -1): the handler, not the server, ends a
    message's deliveries (services/common/delivery.py). A server limit would stop delivering a message
    whose worker died on each try (killed, out of memory) and lose it with no dead letter or failure
    event: nobody hears the server's MAX_DELIVERIES advisory."""
    return ConsumerConfig(max_deliver=-1, ack_wait=settings.ack_wait_s)


def nats_security(settings: ServiceSettings):
    """The service's nats-server credentials for FastStream (None: a server without auth)."""
    opts = settings.nats_options
    return NatsUserPassword(opts["user"], opts["password"]) if opts else None


def _tolerate_any_subject(nc) -> None:
    """Hand nats-py a message whose subject is not UTF-8 with the bad bytes replaced, instead of letting it
    raise while decoding: that happens in the connection's read loop, which ends for good on it, and the
    service (its consumers, its publishes' acks, the trainer's control subscription) hears nothing more.
    A subject is whatever bytes a publisher sent; such a message is then dead-lettered or ignored like
    any other it does not handle. (The recorder's own connection does the same: services/audit/pull.py.)"""
    process = nc._process_msg

    async def process_msg(sid, subject, reply, data, headers):  # noqa: ANN001 - nats-py's signature
        try:
            subject.decode()
            reply.decode()
        except UnicodeDecodeError:
            subject, reply = (bytes(subject).decode(errors="replace").encode(),
                              bytes(reply).decode(errors="replace").encode())
        await process(sid, subject, reply, data, headers)

    nc._process_msg = process_msg


class Service:
    """A service process: one broker, its consumers, its artifact store, its JetStream context."""

    def __init__(self, name: str, settings: ServiceSettings):
        self.name = name
        self.settings = settings
        configure_logging(name, settings.log_level)
        # FastStream logs through structlog too (JSON, with the ids bound per message); its
        # per-message "Received/Processed" lines are DEBUG: our handlers log what they did.
        self.broker = NatsBroker(settings.nats_url, name=f"tuneline-{name}", logger=get_logger("faststream"),
                                 log_level=logging.DEBUG, security=nats_security(settings))
        self.artifacts = ArtifactStore(settings.artifact_root)
        self._js: JetStreamContext | None = None
        self._startup_hooks: list = []
        self._durables: list[str] = []
        self.app = FastStream(self.broker, after_startup=[self._after_startup])

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.broker._connection.jetstream()  # the broker's own connection
        return self._js

    async def _after_startup(self) -> None:
        log.info("service_started", nats_url=self.settings.nats_url)

    def consume(self, spec: ConsumerSpec, handler: Handler, *, replay: Replay | None = None) -> None:
        self._durables.append(spec.durable)

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
            await handle_delivery(msg.raw_message, spec, handler, self.js, self.artifacts, self.settings, replay)

    def on_startup(self, hook) -> None:
        """Run `await hook(self)` once connected and declared, before any consumer takes a message."""
        self._startup_hooks.append(hook)

    async def prepare_broker(self) -> None:
        """Connect and declare streams before subscribers start (they need the stream to exist)."""
        await self.broker.connect()
        _tolerate_any_subject(self.broker._connection)
        await declare_streams(self.js)
        await self._align_consumers()
        for hook in self._startup_hooks:
            await hook(self)

    async def _align_consumers(self) -> None:
        """A durable consumer made before redeliveries became unlimited keeps its server limit (the
        subscriber does not update an existing consumer): lift it, so that a stack upgraded in place
        cannot drop a message either (see consumer_config); likewise its ack_wait, so that an upgraded
        stack recovers from a killed worker as quickly as a new one."""
        for durable in self._durables:
            try:
                info = await self.js.consumer_info(subjects.STREAM, durable)
            except NotFoundError:
                continue  # the subscriber creates it with consumer_config
            wanted = consumer_config(self.settings)
            if info.config.max_deliver != -1 or info.config.ack_wait != wanted.ack_wait:
                await self.js.add_consumer(subjects.STREAM, info.config.evolve(max_deliver=-1, ack_wait=wanted.ack_wait))
                log.info("consumer_updated", durable=durable, max_deliver=-1, ack_wait=wanted.ack_wait,
                         was=(info.config.max_deliver, info.config.ack_wait))

    def run(self) -> None:
        import asyncio

        async def main() -> None:
            await self.prepare_broker()
            await self.app.run()

        asyncio.run(main())
