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

`held(ctx)` is `ctx.keep_alive()` that may be nested: the trainer holds its trigger with in_progress()
heartbeats for the whole handler (preflight, uploads, provider job creation, training, artifact
uploads), and the inner sections that used to start their own heartbeat no longer start a second one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from contracts import subjects
from contracts.envelope import Envelope
from contracts.events import TrainingCompleted
from contracts.registry import decode, encode
from services.common.bus import publish
from services.common.delivery import StageContext
from services.common.ids import derived_event_id
from services.common.logging import get_logger

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(record, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


async def _publish(ctx: StageContext, env: Envelope) -> None:
    await publish(ctx.js, env, subjects.subject_for(env.type, kind="event"))
    log.info("event_emitted", emitted_type=env.type, emitted_event_id=str(env.event_id))


async def complete(ctx: StageContext, completed: TrainingCompleted, *, cleanup: Path | None = None) -> Envelope:
    """Record, then publish `training.completed`, then remove `cleanup` (the job's checkpoints)."""
    env = ctx.envelope_for(completed)
    path = completion_record_path(ctx.settings.data_dir, ctx.envelope.event_id)
    await asyncio.to_thread(write_completion_record, path, ctx.envelope.event_id, env)
    await _publish(ctx, env)
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
    await _publish(ctx, env)
    if cleanup is not None:  # a crash after the record but before the cleanup left them
        await asyncio.to_thread(shutil.rmtree, cleanup, True)
    return env


_held: set[int] = set()


@asynccontextmanager
async def held(ctx: StageContext):
    """ctx.keep_alive(), started once per delivery even when nested."""
    key = id(ctx)
    if key in _held:
        yield
        return
    _held.add(key)
    try:
        async with ctx.keep_alive():
            yield
    finally:
        _held.discard(key)
