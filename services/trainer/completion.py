"""What makes a finished training job final across redeliveries (D3, D5).

A trigger can be redelivered after its job completed: the process died, or the ack was lost, between
publishing `training.completed` and the ack. Training again would repeat the whole job (its
checkpoints are gone), and once the stream's duplicate window has passed a second `training.completed`
with the same id would reach the evaluator, export and registry again. So before `training.completed`
is published, its whole envelope is written to a small completion record named by the trigger
(`<data_dir>/trainer/completed/<trigger>.json`, atomically: write, fsync, rename, fsync the directory);
only then is it published and are the bulky checkpoints removed. A redelivery that finds the record
trains nothing: it publishes the identical `training.completed` (same deterministic id, same payload,
same adapter artifact) and returns.

A record that does not read back whole (bad JSON, a digest mismatch, another trigger's id, a message
that does not decode) is ignored with a warning, as if the job had not completed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import uuid
from pathlib import Path

from contracts.envelope import Envelope
from contracts.events import TrainingCompleted
from contracts.registry import decode, encode
from services.common.delivery import StageContext
from services.common.ids import derived_event_id
from services.common.logging import get_logger
from services.trainer.local.engine import atomic_write_bytes

log = get_logger(__name__)

RECORD_VERSION = 1


def completion_record_path(data_dir: Path, trigger_id: uuid.UUID) -> Path:
    return (Path(data_dir) / "trainer" / "completed" / f"{trigger_id}.json").resolve()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_completion_record(path: Path, trigger_id: uuid.UUID, env: Envelope) -> None:
    """Write (atomically) the record of a completed job: the whole `training.completed` envelope."""
    text = encode(env).decode()
    record = {"version": RECORD_VERSION, "trigger_event_id": str(trigger_id), "envelope": text,
              "sha256": _digest(text)}
    atomic_write_bytes(path, json.dumps(record, sort_keys=True).encode())


def read_completion_record(path: Path, trigger_id: uuid.UUID, expected_event_id: uuid.UUID) -> Envelope | None:
    """The `training.completed` envelope recorded for this trigger, or None (absent or not whole)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("completion_record_unreadable", path=str(path), error=str(exc))
        return None
    try:
        record = json.loads(raw)
        text = record["envelope"]
        if record.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown record version {record.get('version')!r}")
        if record.get("trigger_event_id") != str(trigger_id):
            raise ValueError(f"record is for trigger {record.get('trigger_event_id')!r}")
        if record.get("sha256") != _digest(text):
            raise ValueError("envelope digest mismatch")
        env, payload = decode(text.encode())  # validated (and upcast) like any message on the bus
        if not isinstance(payload, TrainingCompleted) or env.event_id != expected_event_id \
                or env.causation_id != trigger_id:
            raise ValueError(f"record holds {env.type} {env.event_id}, not this trigger's training.completed")
        return env
    except Exception as exc:  # noqa: BLE001 - a damaged record is as good as none: train (or resume) again
        log.warning("completion_record_ignored", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return None


async def complete(ctx: StageContext, completed: TrainingCompleted, *, cleanup: Path | None = None) -> Envelope:
    """Record, then publish `training.completed`, then remove `cleanup` (the job's checkpoints)."""
    env = ctx.envelope_for(completed)
    path = completion_record_path(ctx.settings.data_dir, ctx.envelope.event_id)
    await asyncio.to_thread(write_completion_record, path, ctx.envelope.event_id, env)
    await ctx.publish(env)
    if cleanup is not None:
        # The adapter is in the artifact store and the completion recorded: the checkpoints have done their job.
        await asyncio.to_thread(shutil.rmtree, cleanup, True)
    return env


async def replay_completion(ctx: StageContext, cleanup: Path | None = None) -> Envelope | None:
    """If this trigger's job already completed, publish the recorded `training.completed` again
    (the identical envelope: same id, payload and adapter artifact) and return it; else None."""
    trigger = ctx.envelope.event_id
    path = completion_record_path(ctx.settings.data_dir, trigger)
    expected = derived_event_id(trigger, f"{ctx.producer}/training.completed")
    env = await asyncio.to_thread(read_completion_record, path, trigger, expected)
    if env is None:
        return None
    log.info("training_already_completed", record=str(path), emitted_event_id=str(env.event_id))
    await ctx.publish(env)
    if cleanup is not None:  # a crash after the record but before the cleanup left them
        await asyncio.to_thread(shutil.rmtree, cleanup, True)
    return env
