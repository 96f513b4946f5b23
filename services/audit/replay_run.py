"""Re-running a run from a stage with the same inputs (`tuneline replay run RUN_ID --from STAGE`), e.g. to
re-evaluate a trained model with a fixed evaluator.

The stage's trigger as recorded for the origin run (the event its durable consumer took: training.completed
for the evaluator, prep.prepared for the trainer...) is re-issued under a new run id, after a `run.replayed`
event that names the origin run and causes it. The stage takes it as it took the original: same payload,
so the same artifacts, plan and settings; a new event id, so the handler's derived ids (D3) are new and
nothing the origin run did is deduplicated away. The origin run is not touched. The trigger keeps its
producer (it is that stage's output, repeated); who re-issued it is in the run.replayed event before it.
"""

from __future__ import annotations

import uuid

import asyncpg
import nats

from contracts import subjects

from contracts.envelope import Envelope, Severity
from contracts.errors import ReasonCodedError
from contracts.events import RunReplayed
from services.audit import exactjson
from services.audit.replay_consumer import STAGES
from services.common.bus import PublishError, publish
from services.common.commands import envelope_of
from services.common.delivery import ConsumerSpec
from services.common import ids
from services.common.logging import get_logger

log = get_logger(__name__)


class RunReplayRefused(ReasonCodedError):
    """`tuneline replay run` cannot re-issue the run from that stage (no such run, no recorded trigger)."""


def stage_specs(stage: str) -> list[ConsumerSpec]:
    """The durable consumers through which `stage` starts its part of a run (not its control commands)."""
    import importlib

    if stage not in STAGES:
        raise RunReplayRefused("audit.replay_stage_not_reached", f"no stage {stage!r} (one of {', '.join(STAGES)})")
    module = importlib.import_module(f"services.{stage}.app")
    specs = [v for v in vars(module).values() if isinstance(v, ConsumerSpec) and v.stage == stage]
    if stage == "ingest":  # a run starts with its command
        return [s for s in specs if {"run.start", "ingest.commit"} & set(s.accepts)]
    if stage == "registry":
        return [s for s in specs if "export.completed" in s.accepts]
    return [s for s in specs if s.subject.startswith(f"{subjects.EVENTS}.")]


_TRIGGER = """
SELECT global_position, event_id, type, schema_version, run_id, correlation_id, causation_id, occurred_at,
       producer, severity, reason_code, subject, payload::text AS payload
FROM run_events WHERE run_id = $1 AND type = ANY($2::text[]) ORDER BY global_position LIMIT 1
"""


async def rerun(nats_url: str, dsn: str, run_id: str, stage: str, *, actor: str, new_run_id: str | None = None,
                producer: str = "cli") -> dict:
    """Publish run.replayed and the re-issued trigger; returns what was started. `producer`: the CLI or the API."""
    new = new_run_id or ids.new_run_id()
    types = sorted({t for s in stage_specs(stage) for t in s.accepts})
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM run_events WHERE run_id = $1)", run_id):
            raise RunReplayRefused("audit.replay_run_not_found", f"no recorded event of run {run_id}")
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM run_events WHERE run_id = $1)", new):
            raise RunReplayRefused("audit.replay_run_not_found", f"run {new} exists already: give another id")
        trigger = await conn.fetchrow(_TRIGGER, run_id, types)
    finally:
        await conn.close()
    if trigger is None:
        raise RunReplayRefused("audit.replay_stage_not_reached",
                               f"run {run_id} never reached {stage}: no {' or '.join(types)} is recorded for it")
    replayed = envelope_of(RunReplayed(origin_run_id=run_id, from_stage=stage, trigger_event_id=str(trigger["event_id"]),
                                       trigger_type=trigger["type"], requested_by=actor), new, producer)
    again = Envelope(
        event_id=uuid.uuid5(replayed.event_id, "trigger"), type=trigger["type"],
        schema_version=trigger["schema_version"], run_id=new, correlation_id=new, causation_id=replayed.event_id,
        producer=trigger["producer"], severity=Severity(trigger["severity"]), reason_code=trigger["reason_code"],
        payload=exactjson.loads(trigger["payload"]))
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await publish(js, replayed, subjects.subject_for(replayed.type, kind="event"))
        try:
            await publish(js, again, trigger["subject"], timeout=5.0)
        except (PublishError, nats.errors.Error) as exc:  # a NATS user without the right to publish them
            raise RunReplayRefused("audit.replay_publish_refused",
                                   f"the bus did not take the re-issued {trigger['type']} ({exc}); run.replayed "
                                   f"{replayed.event_id} records the attempt") from None
    finally:
        await nc.close()
    log.info("run_replayed", origin_run_id=run_id, run_id=new, from_stage=stage, trigger_type=trigger["type"])
    return {"run_id": new, "origin_run_id": run_id, "from_stage": stage, "trigger_type": trigger["type"],
            "trigger_event_id": str(trigger["event_id"]), "reissued_event_id": str(again.event_id),
            "event_id": str(replayed.event_id)}
