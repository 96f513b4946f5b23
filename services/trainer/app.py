"""Trainer service: `prep.prepared` -> recipe -> preflight -> local LoRA or hosted fine-tune.

Events: `preflight.passed` / `preflight.blocked`, then `training.started`, throttled
`training.progress`, `training.checkpointed`, `training.paused` / `training.resumed`, and
`training.completed` or `training.failed` (reason codes in contracts.reason_codes).

Crash-safety (D5): the trigger is held with in_progress() heartbeats for the whole handler
(preflight, reading the splits, hosted uploads and job creation, training, the adapter upload), so it
is not redelivered to another trainer while this one works. Local training checkpoints into a work
directory named by the trigger's event id, so when the trigger is redelivered after a crash the new
attempt finds the checkpoints and resumes; hosted jobs are keyed by uuid5(trigger, "hosted-train"), so
a redelivery follows the job already created instead of creating a second one (D3). A completed job
is recorded before `training.completed` is published (services.trainer.completion): a redelivery
after that (a crash or a lost ack before the ack) publishes the same `training.completed` again and
trains nothing.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from contracts import subjects
from contracts.common import HostedSettings
from contracts.envelope import Severity
from contracts.events import (
    PreflightBlocked,
    PreflightPassed,
    TrainingCheckpointed,
    TrainingCompleted,
    TrainingFailed,
    TrainingPaused,
    TrainingProgressed,
    TrainingRestarted,
    TrainingResumed,
    TrainingStarted,
)
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.jsonl import loads_jsonl
from services.common.logging import get_logger
from services.trainer.completion import complete, replay_completion
from services.trainer.control import ControlRegistry
from services.trainer.emitter import OrderedEmitter
from services.trainer.local.engine import (
    LATEST,
    Callbacks,
    Checkpointed,
    Progress,
    TrainingCancelled,
    TrainingDiverged,
    TrainingTimedOut,
    train,
)
from services.trainer.local.tasks import task_for
from services.trainer.preflight import run_preflight
from services.trainer.recipes import Recipe, RecipeError, resolve_recipe
from services.trainer.settings import TrainerSettings

log = get_logger(__name__)

PREPARED = ConsumerSpec(service="trainer", durable="trainer-prep-prepared",
                        subject=subjects.subject_for("prep.prepared", kind="event"),
                        accepts=("prep.prepared",), failure_type=TrainingFailed, stage="trainer")


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, TrainingCancelled):
        return "training.cancelled"
    if isinstance(exc, TrainingTimedOut):
        return "training.timeout"
    if isinstance(exc, TrainingDiverged):
        return "training.diverged"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "training.oom"
    if isinstance(exc, OSError):
        return "training.base_model_unavailable"
    return "training.runtime_error"


def work_dir_for(settings: TrainerSettings, trigger_id: uuid.UUID) -> Path:
    """Checkpoints of one training job: named by the trigger, so a redelivery finds them."""
    return (settings.data_dir / "trainer" / "work" / str(trigger_id)).resolve()


def checkpoint_step(work_dir: Path) -> int | None:
    try:
        import json

        return int(json.loads((work_dir / LATEST).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def make_replay(settings: TrainerSettings):
    """Publish the recorded outcome of a trigger whose job already completed (services.trainer.completion)."""
    def replay(ctx: StageContext):
        return replay_completion(ctx, cleanup=work_dir_for(settings, ctx.envelope.event_id))
    return replay


def make_on_prepared(settings: TrainerSettings, controls: ControlRegistry):
    replay = make_replay(settings)

    async def on_prepared(ctx: StageContext) -> None:
        async with ctx.keep_alive():  # heartbeats from the first to the last line (D5)
            await _on_prepared(ctx)

    async def _on_prepared(ctx: StageContext) -> None:
        # A redelivery of a trigger whose job already completed: publish the same outcome, train nothing.
        if await replay(ctx):
            return
        p = ctx.payload
        plan = p.plan
        if ctx.delivery > 1 and plan.backend == "local":  # the first thing a new attempt says (see train_locally)
            await ctx.emit(TrainingRestarted(delivery=ctx.delivery,
                                             resumed_from_step=checkpoint_step(work_dir_for(settings, ctx.envelope.event_id))),
                           step=f":restarted-{ctx.delivery}")
        shape = plan.mapping.shape if plan.mapping else "single_label_classification"
        try:
            recipe = resolve_recipe(plan.recipe, shape, plan.training_overrides())
        except RecipeError as exc:
            raise StageError(exc.reason_code, str(exc)) from exc
        if plan.tuning is not None:  # a search space the recipe refuses fails here, before preflight
            from services.trainer.tune_runner import planned_trials

            planned_trials(plan, recipe)
        try:
            rows, eval_rows = await asyncio.to_thread(
                lambda: (loads_jsonl(ctx.artifacts.read_bytes(p.train)), loads_jsonl(ctx.artifacts.read_bytes(p.eval))))
        except ArtifactIntegrityError as exc:
            raise StageError("training.runtime_error", f"train or eval split unreadable: {exc}") from exc

        report = await asyncio.to_thread(
            run_preflight, recipe, backend=plan.backend, shape=shape, train_rows=len(rows), eval_rows=len(eval_rows),
            label_count=len(p.label_space), data_warnings=list(p.warnings), mode=plan.preflight,
            hosted=plan.hosted or HostedSettings(), cost_estimate=p.cost_estimate,
        )
        if not report.passed:
            await ctx.emit(PreflightBlocked(plan=plan, train_plan=report.train_plan, checks=report.checks,
                                            blockers=report.blockers, memory=report.memory),
                           severity=Severity.ERROR, reason_code="preflight.blocked")
            return
        await ctx.emit(PreflightPassed(plan=plan, train_plan=report.train_plan, checks=report.checks,
                                       memory=report.memory, warnings=report.warnings, mode=plan.preflight))

        control = controls.for_run(ctx.envelope.run_id)
        if control.cancelled:
            raise StageError("training.cancelled", f"cancelled by {control.requested_by} before training started")
        if settings.timeout_s:
            control.deadline = time.monotonic() + settings.timeout_s
        if plan.backend == "local":
            await train_locally(ctx, settings, recipe, rows, eval_rows, control)
        else:
            from services.trainer.hosted_runner import train_hosted

            await train_hosted(ctx, plan.hosted or HostedSettings(), control, controls)

    return on_prepared


async def train_locally(ctx: StageContext, settings: TrainerSettings, recipe: Recipe, rows: list[dict],
                        eval_rows: list[dict], control) -> None:
    p = ctx.payload
    work_dir = work_dir_for(settings, ctx.envelope.event_id)
    resume_at = checkpoint_step(work_dir)
    tag_space = sorted({t for r in rows + eval_rows for t in r.get("tags") or []})
    task = task_for(recipe, p.label_space, tag_space)
    # Every attempt leaves its own trace (training.restarted, then its events): after the first delivery, the
    # ids of an attempt's events name its delivery, so a trainer killed before its first checkpoint, retraining from step 0, does not publish
    # the first attempt's ids again (and have its events dropped as duplicates). The first attempt keeps
    # the ids it always had.
    attempt = f":delivery-{ctx.delivery}" if ctx.delivery > 1 else ""
    if p.plan.tuning is not None:  # trials on train, scored on validation; the final model gets the best settings
        from services.trainer.tune_runner import tune_locally

        try:
            recipe = await tune_locally(ctx, recipe, rows, eval_rows, work_dir, control,
                                        lambda r: task_for(r, p.label_space, tag_space), settings.progress_every_s)
        except StageError:
            raise
        except (TrainingCancelled, TrainingTimedOut, ValueError, MemoryError, OSError, RuntimeError) as exc:
            raise StageError(failure_reason(exc), f"{type(exc).__name__}: {exc}") from exc
        task = task_for(recipe, p.label_space, tag_space)
        resume_at = checkpoint_step(work_dir)
    await ctx.emit(TrainingStarted(plan=p.plan, base_model=recipe.base_model, max_steps=recipe.steps_for(len(rows)),
                                   train_rows=len(rows), recipe=recipe.name, backend="local",
                                   resumed_from_step=resume_at),
                   step=f":from-{resume_at or 0}{attempt}")
    emitter = OrderedEmitter(ctx)
    emit_from_thread = emitter.emit
    pauses = {"n": 0}

    def on_progress(pr: Progress) -> None:
        emit_from_thread(TrainingProgressed(
            step=pr.step, max_steps=pr.max_steps, epoch=pr.epoch, loss=pr.loss, learning_rate=pr.learning_rate,
            examples_per_s=pr.examples_per_s, eta_s=pr.eta_s, eval_loss=pr.eval_loss), f":{pr.step}{attempt}")

    def on_checkpoint(c: Checkpointed) -> None:
        emit_from_thread(TrainingCheckpointed(
            step=c.step, max_steps=c.max_steps, epoch=c.epoch, metric_name=c.metric_name, metric=c.metric,
            eval_loss=c.eval_loss, is_best=c.is_best, checkpoint=str(c.path), sha256=c.sha256), f":ckpt-{c.step}{attempt}")

    def on_pause(step: int) -> None:
        pauses["n"] += 1
        emit_from_thread(TrainingPaused(step=step, requested_by=control.requested_by or "unknown"),
                         f":paused-{step}-{pauses['n']}{attempt}")

    def on_resume(step: int) -> None:
        emit_from_thread(TrainingResumed(step=step, requested_by=control.requested_by or "unknown"),
                         f":resumed-{step}-{pauses['n']}{attempt}")

    def on_warning(code: str, message: str) -> None:
        log.warning("training_warning", reason_code=code, error=message)

    callbacks = Callbacks(on_progress=on_progress, on_checkpoint=on_checkpoint, on_pause=on_pause,
                          on_resume=on_resume, on_warning=on_warning)
    with tempfile.TemporaryDirectory(prefix="tuneline-train-") as tmp:
        try:
            async with ctx.keep_alive():
                result = await asyncio.to_thread(train, task, recipe, rows, eval_rows, work_dir, Path(tmp) / "adapter",
                                                 control=control, callbacks=callbacks,
                                                 progress_every_s=settings.progress_every_s)
        except (TrainingCancelled, TrainingTimedOut, TrainingDiverged, ValueError, MemoryError, OSError,
                RuntimeError) as exc:
            raise StageError(failure_reason(exc), f"{type(exc).__name__}: {exc}") from exc
        finally:
            await emitter.close()
        async with ctx.keep_alive():
            adapter = await asyncio.to_thread(ctx.artifacts.put_dir, result.adapter_dir)
    log.info("training_done", steps=result.steps, wall_s=round(result.wall_s, 2), best_step=result.best_step,
             best_metric=result.best_metric, resumed_from_step=result.resumed_from_step)
    # Recorded before it is published, and the checkpoints removed only after both: a redelivery from
    # here on publishes this same event again instead of training from step 0.
    await complete(ctx, TrainingCompleted(
        plan=p.plan, base_model=recipe.base_model, adapter=adapter, manifest=p.manifest, eval=p.eval,
        label_space=p.label_space, steps=result.steps, final_loss=result.final_loss,
        examples_per_s=result.examples_per_s, wall_s=result.wall_s, recipe=recipe.name, task=recipe.task,
        best_step=result.best_step, best_metric=result.best_metric, metric_name=result.metric_name,
        stopped_early=result.stopped_early, resumed_from_step=result.resumed_from_step,
        train=p.train, test=p.test, test_set=p.test_set,
    ), cleanup=work_dir)


def build(settings: TrainerSettings | None = None) -> Service:
    settings = settings or TrainerSettings()
    svc = Service("trainer", settings)
    controls = ControlRegistry()

    async def follow_controls(service: Service) -> None:
        await controls.follow(service.js)

    svc.on_startup(follow_controls)
    svc.consume(PREPARED, make_on_prepared(settings, controls), replay=make_replay(settings))
    return svc


def main() -> None:
    build().run()
