"""The ack policy every subscriber follows (D4): nothing is acked before its effects are published,
and nothing is dropped without a dead letter and a failure event.

Outcomes of one delivery:
- the handler returns: its events are published (awaited), then the message is acked;
- the handler raises StageError: a `<stage>.failed` event with the reason code, then ack
  (the message was fine; the work it asked for failed, and that is part of the run's history);
- the message does not decode (bad JSON, unknown type, invalid payload): dead-lettered with a
  `bus.message_dead_lettered` event, then terminated (redelivering it cannot help);
- any other exception: nacked with backoff; on the last allowed delivery, dead-lettered with
  `bus.delivery_exhausted` and terminated, so a poison message cannot loop;
- a delivery beyond the allowed number (each earlier one ended without a settlement: the worker
  died, or publishing its outcome failed): the consumer's replay, if it has one, publishes an outcome
  an earlier delivery recorded (the trainer's completed job) and the message is acked; otherwise
  dead-lettered with `bus.delivery_exhausted` without running the handler again. The server redelivers without limit (services/common/app.py), so this
  delivery always comes; if dead-lettering fails too, the next one tries again.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel

from contracts import subjects
from contracts.envelope import Envelope, Severity
from contracts.events import MessageDeadLettered
from contracts.errors import ReasonCodedError
from contracts.registry import ContractError, decode, message_type_of
from services.common.artifacts import ArtifactStore
from services.common.bus import fits, publish
from services.common.ids import dead_letter_event_id, derived_event_id
from services.common.logging import get_logger, message_context
from services.common.settings import ServiceSettings

log = get_logger(__name__)

UNATTRIBUTED_RUN = "unattributed"
# A stage failure's message goes into its `<stage>.failed` event beside the trigger's plan: one that quotes
# a huge input (a multi-megabyte locator) took the event over the server's max_payload, so the failure was
# never published, the trigger came back until bus.delivery_exhausted, and the reason was lost.
MAX_FAILURE_MESSAGE = 4000


class StageError(ReasonCodedError):
    """A failure of the work a message asked for, with a registered reason code."""


@dataclass
class StageContext:
    """What a handler gets: the trigger, typed payload, and ways to emit events and keep alive."""

    envelope: Envelope
    payload: Any
    producer: str
    js: JetStreamContext
    artifacts: ArtifactStore
    settings: ServiceSettings
    raw: Msg
    _kept_alive: bool = field(default=False, init=False, repr=False)

    @property
    def delivery(self) -> int:
        """Which delivery of the trigger this is: 1 the first, more after a worker died or a handler failed
        (1 for a message without JetStream metadata, as tests hand handlers)."""
        try:
            return self.raw.metadata.num_delivered
        except Exception:  # noqa: BLE001 - not a JetStream message
            return 1

    def envelope_for(
        self,
        payload: BaseModel,
        *,
        step: str = "",
        severity: Severity = Severity.INFO,
        reason_code: str | None = None,
    ) -> Envelope:
        mt = message_type_of(payload)
        return Envelope(
            event_id=derived_event_id(self.envelope.event_id, f"{self.producer}/{mt.name}{step}"),
            type=mt.name,
            schema_version=mt.version,
            run_id=self.envelope.run_id,
            correlation_id=self.envelope.correlation_id,
            causation_id=self.envelope.event_id,
            producer=self.producer,
            severity=severity,
            reason_code=reason_code,
            payload=payload.model_dump(mode="json"),
        )

    async def emit(self, payload: BaseModel, *, step: str = "", target: str | None = None, **kw) -> Envelope:
        return await self.publish(self.envelope_for(payload, step=step, **kw), target=target)

    async def publish(self, env: Envelope, *, target: str | None = None) -> Envelope:
        """Publish an envelope made for this trigger (by envelope_for, now or by an earlier delivery)."""
        await publish(self.js, env, subjects.subject_for(env.type, kind="event", target=target))
        log.info("event_emitted", emitted_type=env.type, emitted_event_id=str(env.event_id))
        return env

    @asynccontextmanager
    async def keep_alive(self):
        """Heartbeat the trigger with in_progress() while long work runs, so it is not redelivered.
        Nested uses share the outermost one's heartbeat."""
        if self._kept_alive:
            yield
            return
        self._kept_alive = True
        interval = max(1.0, self.settings.ack_wait_s / 3)

        async def beat():
            while True:
                await asyncio.sleep(interval)
                await self.raw.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            self._kept_alive = False


Handler = Callable[[StageContext], Awaitable[None]]
# Publishes again what an earlier delivery already finished (a recorded outcome), if anything; truthy
# when it did. Consulted before a delivery beyond the allowed number is dead-lettered.
Replay = Callable[[StageContext], Awaitable[Any]]


@dataclass(frozen=True)
class ConsumerSpec:
    """One durable pull consumer of a service: what it listens to and how it reports failure."""

    service: str
    durable: str
    subject: str
    accepts: tuple[str, ...]  # registered types this consumer handles
    failure_type: Callable[..., BaseModel] | None  # payload model of `<stage>.failed`
    stage: str

    def __post_init__(self) -> None:
        # The timeline tells which stage a dead letter failed from the consumer's name (consumer_stage).
        if not self.durable.startswith(f"{self.stage}-"):
            raise ValueError(f"durable {self.durable!r} of stage {self.stage!r} must start with {self.stage + '-'!r}")


async def handle_delivery(
    msg: Msg,
    spec: ConsumerSpec,
    handler: Handler,
    js: JetStreamContext,
    artifacts: ArtifactStore,
    settings: ServiceSettings,
    replay: Replay | None = None,
) -> str:
    """Apply the ack policy to one delivery; returns the outcome (for logs and tests)."""
    md = msg.metadata
    try:
        env, payload = decode(msg.data)
        if env.type not in spec.accepts:
            raise ContractError(
                "bus.unexpected_subject", f"{spec.durable} does not handle {env.type!r} (arrived on {msg.subject})"
            )
    except ContractError as exc:
        return await _dead_letter_and_end(js, msg, spec, exc.reason_code, str(exc))

    ctx = StageContext(env, payload, spec.service, js, artifacts, settings, msg)
    if md.num_delivered > settings.max_deliver:
        with message_context(env, consumer=spec.durable, delivery=md.num_delivered):
            if replay is not None and await _replayed(replay, ctx):
                # the last delivery finished the work and died before settling: its outcome stands
                log.info("replayed_after_unsettled_deliveries", deliveries=md.num_delivered)
                await msg.ack()
                return "replayed"
            log.error("delivery_exhausted", deliveries=md.num_delivered, unsettled=True)
        return await _dead_letter_and_end(
            js, msg, spec, "bus.delivery_exhausted", f"delivered {md.num_delivered - 1} times without being settled "
            "(the worker died or could not publish its outcome each time); not handled again", env)

    plan = getattr(payload, "plan", None)
    if plan is not None and not plan.runs(spec.stage):
        with message_context(env, consumer=spec.durable, delivery=md.num_delivered):
            log.info("stage_not_in_plan", stage=spec.stage, until=plan.until)
        await msg.ack()
        return "skipped"

    with message_context(env, consumer=spec.durable, delivery=md.num_delivered):
        try:
            # Every handler heartbeats while it runs, so ack_wait can be short: a message whose worker
            # died comes back within ack_wait (seconds), one whose worker lives never does.
            async with ctx.keep_alive():
                await handler(ctx)
        except StageError as exc:
            log.warning("stage_failed", reason_code=exc.reason_code, error=str(exc)[:MAX_FAILURE_MESSAGE])
            if spec.failure_type is not None:
                failure = spec.failure_type(stage=spec.stage, message=str(exc)[:MAX_FAILURE_MESSAGE],
                                            trigger_type=env.type, plan=getattr(payload, "plan", None))
                await ctx.emit(failure, severity=Severity.ERROR, reason_code=exc.reason_code)
            await msg.ack()
            return "failed"
        except Exception as exc:  # noqa: BLE001 - every other error is transient until proven poison
            if md.num_delivered >= settings.max_deliver:
                log.error("delivery_exhausted", error=repr(exc), deliveries=md.num_delivered, exc_info=exc)
                return await _dead_letter_and_end(js, msg, spec, "bus.delivery_exhausted",
                                                  f"{type(exc).__name__}: {exc}", env)
            backoff = settings.nack_backoff_s
            delay = backoff[min(md.num_delivered - 1, len(backoff) - 1)]
            log.warning("handler_error_nacked", error=repr(exc), deliveries=md.num_delivered, retry_in_s=delay)
            await msg.nak(delay=delay)
            return "nacked"
        await msg.ack()
        return "acked"


async def _dead_letter_and_end(js: JetStreamContext, msg: Msg, spec: ConsumerSpec, reason_code: str, error: str,
                               envelope: Envelope | None = None) -> str:
    """Dead-letter the message with a failure event, then end its deliveries."""
    await dead_letter(js, msg, consumer=spec.durable, producer=spec.service, reason_code=reason_code, error=error,
                      envelope=envelope)
    await msg.term()
    return "dead_lettered"


async def _replayed(replay: Replay, ctx: StageContext) -> bool:
    try:
        return bool(await replay(ctx))
    except Exception as exc:  # noqa: BLE001 - a replay that fails cannot hold the message: dead-letter it
        log.error("replay_failed", error=repr(exc), exc_info=exc)
        return False


async def dead_letter(
    js: JetStreamContext,
    msg: Msg,
    *,
    consumer: str,
    producer: str,
    reason_code: str,
    error: str,
    envelope: Envelope | None = None,
) -> None:
    """Copy the message to the DLQ stream, then announce it with a failure event.

    Both publishes are idempotent (ids derive from consumer and stream sequence), so a crash
    between them and a redelivery produce neither a second dead letter nor a second event.
    """
    seq = msg.metadata.sequence.stream
    dlq_subj = subjects.dlq_subject(consumer)
    headers = {
        "Nats-Msg-Id": f"{consumer}:{seq}",
        "Tuneline-Original-Subject": msg.subject,
        "Tuneline-Original-Sequence": str(seq),
        "Tuneline-Consumer": consumer,
        "Tuneline-Reason-Code": reason_code,
        "Tuneline-Error": error[:1000],
    }
    body = msg.data
    if not fits(js, body, headers):
        # The server took the message with its own headers, not with these: keep the headers, point at
        # the original (RUN_EVENTS refuses deletes and purges) rather than lose the connection over it.
        headers["Tuneline-Body-Omitted"] = (f"{len(body)} bytes, over max_payload with these headers; the original "
                                            f"is {subjects.STREAM} sequence {seq}")
        body = b""
    await js.publish(dlq_subj, body, headers=headers, timeout=10.0)
    run_id, correlation_id, causation = attribution(msg.data, envelope)
    failure = MessageDeadLettered(
        consumer=consumer,
        subject=msg.subject,
        stream_sequence=seq,
        deliveries=msg.metadata.num_delivered,
        error=storable_text(error[:2000]),
        dlq_subject=dlq_subj,
    )
    mt = message_type_of(failure)
    env = Envelope(
        event_id=dead_letter_event_id(consumer, seq),
        type=mt.name,
        schema_version=mt.version,
        run_id=run_id,
        correlation_id=correlation_id,
        causation_id=causation,
        producer=producer,
        severity=Severity.ERROR,
        reason_code=reason_code,
        payload=failure.model_dump(mode="json"),
    )
    await publish(js, env, subjects.subject_for(env.type, kind="event"))
    log.error("dead_lettered", consumer=consumer, stream_seq=seq, reason_code=reason_code, error=error[:300],
              run_id=run_id, correlation_id=correlation_id, event_id=str(causation) if causation else None,
              failure_event_id=str(env.event_id))


def attribution(data: bytes, envelope: Envelope | None) -> tuple[str, str, uuid.UUID | None]:
    """(run_id, correlation_id, causation id) for a failure event about this message, so that it shows
    in the timeline of the run it came from: the envelope's when it decoded, else what its JSON
    holds, else the unattributed run (best effort; the recorder uses it too).

    Never raises, and the ids it returns are storable: this runs for messages that failed to decode,
    whatever they hold (JSON nested past the parser's recursion limit, an integer too long for Python,
    a lone surrogate escape or a NUL in the run id). An error here would leave the message unsettled,
    to be redelivered and fail the same way forever (and the recorder retries its batch forever)."""
    if envelope is not None:
        return _storable_ids(envelope.run_id, envelope.correlation_id) + (envelope.event_id,)
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, a number Python will not read
        return UNATTRIBUTED_RUN, UNATTRIBUTED_RUN, None
    if not isinstance(raw, dict):
        return UNATTRIBUTED_RUN, UNATTRIBUTED_RUN, None
    run_id = raw.get("run_id") if isinstance(raw.get("run_id"), str) and raw.get("run_id") else UNATTRIBUTED_RUN
    corr = raw.get("correlation_id") if isinstance(raw.get("correlation_id"), str) and raw.get("correlation_id") else run_id
    causation = None
    try:
        causation = uuid.UUID(str(raw.get("event_id")))
    except ValueError:
        pass
    return _storable_ids(run_id[:128], corr[:128]) + (causation,)


def storable_text(text: str) -> str:
    """The text with what an envelope (lone surrogates) or a PostgreSQL text column (NUL) refuses taken out."""
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _storable_ids(run_id: str, correlation_id: str) -> tuple[str, str]:
    """Ids a failure event can carry and the recorder can store: else the failure event about a message
    would be refused in turn, dead-lettered, and announced by another failure event attributed the same
    way (a loop)."""
    run_id = storable_text(run_id) or UNATTRIBUTED_RUN
    return run_id, storable_text(correlation_id) or run_id
