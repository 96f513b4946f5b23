"""Hosted training inside the trainer service: submit, follow, control, and the same `training.*` events
as local training (D12).

- The cost estimate from prep is recorded before the job (preflight.passed's train plan and
  training.started); the trained tokens the provider bills are recorded after (training.completed).
- The job is keyed by uuid5(trigger, "hosted-train") (D3) and tagged with the run id and the trigger
  event id (job metadata where the host has it): a redelivered trigger follows the job created before
  the crash instead of creating a second one.
- The trigger is held with in_progress() heartbeats for the whole job (D5): the file uploads and the
  job creation too, which can outlast ack_wait (a large training file), so the trigger is never
  redelivered to another trainer while this one is still submitting.
- The provider is polled from a worker thread; cancel / pause / resume commands for the run are passed
  to the provider at the next poll. Each pause and resume is its own event, identified by the run's
  pause/resume transition counter (Control.transitions), which every trainer process derives the same
  way from the command stream: a redelivery repeats a transition's id, a second pause gets a new one.
- The provider's record of the job is archived as it is followed (services.trainer.hosted.archive): its job
  events in `training.provider_event` batches, the job object at each status change (`training.provider_job`),
  and at the end `training.provider_archived` (checkpoints with every metric, the result files downloaded into
  the artifact store when the job succeeded), published before `training.completed` / `training.failed`.
- The completion is recorded before `training.completed` is published (services.trainer.completion).
- A failure the provider may recover from (a rate limit that outlasted the SDK's retries, a dropped
  connection) is re-raised as a plain error, so the delivery policy nacks and retries it (D4);
  the rest become `training.failed` with the backend's reason code.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from contracts.common import HostedSettings
from contracts.events import (
    TrainingCheckpointed,
    TrainingCompleted,
    TrainingPaused,
    TrainingProgressed,
    TrainingResumed,
    TrainingStarted,
)
from services.common.delivery import StageContext, StageError
from services.common.logging import get_logger
from services.trainer.completion import complete
from services.trainer.emitter import OrderedEmitter
from services.trainer.hosted.archive import JobSnapshots, ProviderEventBatcher, archive_followed_job
from services.trainer.hosted.base import HostedEvent, HostedJobSpec, HostedProgress, HostedTrainingError

log = get_logger(__name__)


def backend_for(backend: str, hosted: HostedSettings):
    if backend == "anthropic":
        from services.trainer.hosted.anthropic_backend import AnthropicHostedBackend

        return AnthropicHostedBackend()
    from services.trainer.hosted.openai_backend import OpenAIHostedBackend

    provider = "openai" if hosted.base_url is None else "openai-compatible"
    return OpenAIHostedBackend(api_key_env=hosted.api_key_env, base_url=hosted.base_url, provider=provider)


def hosted_key(trigger_id: uuid.UUID) -> str:
    return str(uuid.uuid5(trigger_id, "hosted-train"))


def job_labels(ctx: StageContext) -> dict[str, str]:
    """Tags on the provider job besides its idempotency key: which run and which trigger created it."""
    return {"tuneline_run_id": ctx.envelope.run_id[:512], "tuneline_trigger_event_id": str(ctx.envelope.event_id)}


async def train_hosted(ctx: StageContext, hosted: HostedSettings, control, controls, *, backend=None) -> None:
    async with ctx.keep_alive():
        await _train_hosted(ctx, hosted, control, controls, backend=backend)


async def _train_hosted(ctx: StageContext, hosted: HostedSettings, control, controls, *, backend=None) -> None:
    p = ctx.payload
    plan = p.plan
    if p.openai_train is None:
        raise StageError("training.capability_unsupported",
                         "prep wrote no OpenAI chat JSONL for this dataset; hosted training needs it")
    started = time.monotonic()
    try:
        backend = backend or backend_for(plan.backend, hosted)

        def submit() -> str:
            # in a worker thread: verifying the splits' digests and uploading them take a while
            spec = HostedJobSpec(
                base_model=hosted.model, training_file=ctx.artifacts.path(p.openai_train),
                validation_file=ctx.artifacts.path(p.openai_eval) if p.openai_eval else None,
                idempotency_key=hosted_key(ctx.envelope.event_id), n_epochs=hosted.n_epochs,
                batch_size=hosted.batch_size, learning_rate_multiplier=hosted.learning_rate_multiplier,
                suffix=hosted.suffix or plan.target[:18], seed=plan.seed, labels=job_labels(ctx),
            )
            return backend.submit(spec)

        job_id = await asyncio.to_thread(submit)
    except HostedTrainingError as exc:
        _raise_for(exc)
    await ctx.emit(TrainingStarted(plan=plan, base_model=hosted.model, max_steps=0, train_rows=p.train_rows,
                                   recipe=None, backend=plan.backend, hosted_job_id=job_id,
                                   cost_estimate=p.cost_estimate))

    emitter = OrderedEmitter(ctx)
    emit_from_thread = emitter.emit
    last: dict = {"progress": None}
    provider = getattr(backend, "provider", plan.backend)
    batcher = ProviderEventBatcher(provider, job_id)
    snapshots = JobSnapshots(provider, job_id)

    def on_event(ev: HostedEvent) -> None:
        if (batch := batcher.add(ev)) is not None:
            emit_from_thread(batch, ProviderEventBatcher.step(batch))

    def on_job(job) -> None:
        if (snapshot := snapshots.observe(job)) is not None:
            emit_from_thread(snapshot, JobSnapshots.step(snapshot))

    sent: dict = {"cancel": False, "paused": False, "polls": 0}

    def on_progress(pr: HostedProgress) -> None:
        last["progress"] = pr
        emit_from_thread(TrainingProgressed(step=pr.step, max_steps=pr.total_steps, epoch=pr.epoch,
                                            loss=pr.train_loss, learning_rate=pr.learning_rate,
                                            eval_loss=pr.valid_loss, tokens=pr.tokens), f":{pr.step}")

    def on_poll(status: str) -> None:
        # Runs in the polling thread: pass the run's control state to the provider once per change.
        sent["polls"] += 1
        paused, transition, requested_by = control.pause_state()
        if sent["polls"] == 1 and status == "paused" and not paused:
            sent["paused"] = True  # paused by an earlier delivery and resumed since: the resume must reach the provider
        if control.cancelled and not sent["cancel"]:
            sent["cancel"] = True
            backend.cancel(job_id)
        elif paused and not sent["paused"]:
            sent["paused"] = True
            if status != "paused":
                backend.pause(job_id)
            # The transition counter names this pause: a redelivery re-announcing it reuses the id (deduplicated),
            # a later pause of the same job gets its own.
            emit_from_thread(TrainingPaused(requested_by=requested_by or "unknown", hosted_job_id=job_id),
                             f":paused-{job_id}-{transition}")
        elif not paused and sent["paused"]:
            sent["paused"] = False
            backend.resume(job_id)
            emit_from_thread(TrainingResumed(requested_by=requested_by or "unknown", hosted_job_id=job_id),
                             f":resumed-{job_id}-{transition}")

    try:
        async with ctx.keep_alive():
            outcome = await asyncio.to_thread(backend.follow, job_id, on_progress=on_progress, on_event=on_event,
                                              poll_interval=hosted.poll_interval_s, timeout=hosted.timeout_s,
                                              on_poll=on_poll, on_job=on_job)
            if (batch := batcher.flush()) is not None:  # the job ended: its last events close the last batch
                emit_from_thread(batch, ProviderEventBatcher.step(batch))
            archive = await asyncio.to_thread(
                archive_followed_job, backend, ctx.artifacts, provider, snapshots.last, outcome,
                base_model=hosted.model, events_archived=batcher.archived,
                own_files={"training": p.openai_train, "validation": p.openai_eval})
    except HostedTrainingError as exc:
        _raise_for(exc)
    finally:
        await emitter.close()
    await ctx.emit(archive, step=f":{job_id}")
    try:
        outcome.raise_for_status()
    except HostedTrainingError as exc:
        _raise_for(exc)
    for ck in outcome.checkpoints:
        await ctx.emit(TrainingCheckpointed(step=ck.step, eval_loss=ck.valid_loss, checkpoint=ck.model),
                       step=f":ckpt-{ck.id}")
    pr = last["progress"]
    await complete(ctx, TrainingCompleted(
        plan=plan, base_model=hosted.model, adapter=None, manifest=p.manifest, eval=p.eval, label_space=p.label_space,
        steps=pr.step if pr else 0, final_loss=pr.train_loss if pr else None, examples_per_s=None, wall_s=time.monotonic() - started,
        backend=plan.backend, hosted_job_id=job_id, fine_tuned_model=outcome.fine_tuned_model,
        trained_tokens=outcome.trained_tokens, train=p.train, test=p.test, test_set=p.test_set,
    ))
    log.info("hosted_training_done", job_id=job_id, fine_tuned_model=outcome.fine_tuned_model,
             trained_tokens=outcome.trained_tokens)


def _raise_for(exc: HostedTrainingError):
    if exc.retryable:
        raise RuntimeError(str(exc)) from exc  # nacked with backoff by the delivery policy
    raise StageError(exc.reason_code, exc.message) from exc
