"""The trainer's side of plan.tuning: the trials of services/trainer/tuning.py run with the local engine,
each published as `training.trial_completed`, then `training.tuning_completed` naming the winner; the
winner's checkpoints become the final training's (`adopt_winner`), and the caller runs its ordinary path with
the recipe returned here (training.started resumed at the trial's last step, training.completed): the winning
settings are not trained a second time.

Event ids (D3): a trial's event derives from the trigger and the trial number, the same in every attempt,
so a redelivered trigger that publishes a recorded trial again is deduplicated, not appended twice.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from contracts.common import RunPlan
from contracts.events import TrainingPaused, TrainingResumed, TrialCompleted, TuningCompleted
from services.common.delivery import StageContext, StageError
from services.common.logging import get_logger
from services.trainer.emitter import OrderedEmitter
from services.trainer.recipes import Recipe
from services.trainer.tuning import (
    TrialResult,
    TuningError,
    adopt_winner,
    plan_trials,
    run_search,
    search_space,
    settings_of,
    trial_work_dir,
)

log = get_logger(__name__)


def planned_trials(plan: RunPlan, recipe: Recipe) -> list[dict]:
    """The trials `plan.tuning` asks for with `recipe` (the recipe with the plan's overrides); a field the
    plan set explicitly is held fixed unless the tuning space names it. StageError(training.tuning_invalid)
    for a space the recipe refuses; training.capability_unsupported for a hosted backend."""
    tuning = plan.tuning
    assert tuning is not None
    if plan.backend != "local":
        raise StageError("training.capability_unsupported",
                         f"--tune runs local trainings; a {plan.backend} fine-tune is not tuned (leave --tune out)")
    fixed = set(plan.training_overrides()) - {"seed"}
    try:
        space = search_space(recipe, tuning.space, fixed=fixed)
    except TuningError as exc:
        raise StageError(exc.reason_code, str(exc)) from exc
    return plan_trials(recipe, space, tuning.trials, plan.seed)


async def tune_locally(ctx: StageContext, recipe: Recipe, rows: list[dict], eval_rows: list[dict], work_dir: Path,
                       control, make_task, progress_every_s: float) -> Recipe:
    """Run the search; returns the recipe to train the final model with (the best trial's settings, or
    the recipe's own when no trial scored)."""
    from services.trainer.local.engine import Callbacks, train

    p = ctx.payload
    tuning = p.plan.tuning
    planned = planned_trials(p.plan, recipe)
    emitter = OrderedEmitter(ctx)
    pauses = {"n": 0}

    def callbacks_for(k: int) -> Callbacks:
        def on_pause(step: int) -> None:
            pauses["n"] += 1
            emitter.emit(TrainingPaused(step=step, requested_by=control.requested_by or "unknown"),
                         f":trial-{k}-paused-{step}-{pauses['n']}:delivery-{ctx.delivery}")

        def on_resume(step: int) -> None:
            emitter.emit(TrainingResumed(step=step, requested_by=control.requested_by or "unknown"),
                         f":trial-{k}-resumed-{step}-{pauses['n']}:delivery-{ctx.delivery}")

        def on_warning(code: str, message: str) -> None:
            log.warning("trial_warning", trial=k, reason_code=code, error=message)

        return Callbacks(on_pause=on_pause, on_resume=on_resume, on_warning=on_warning)

    async def train_trial(k: int, trial_recipe: Recipe, trial_control):
        with tempfile.TemporaryDirectory(prefix=f"tuneline-trial-{k}-") as tmp:
            async with ctx.keep_alive():
                return await asyncio.to_thread(train, make_task(trial_recipe), trial_recipe, rows, eval_rows,
                                               trial_work_dir(work_dir, k), Path(tmp) / "adapter",
                                               control=trial_control, callbacks=callbacks_for(k),
                                               progress_every_s=progress_every_s)

    async def on_trial(r: TrialResult, is_best: bool) -> None:
        log.info("trial_completed", trial=r.trial, status=r.status, metric=r.metric, wall_s=round(r.wall_s, 2),
                 settings=r.settings)
        await ctx.emit(TrialCompleted(
            trial=r.trial, trials=len(planned), settings=r.settings, status=r.status, metric_name=r.metric_name,
            metric=r.metric, best_step=r.best_step, steps=r.steps, wall_s=r.wall_s, train_rows=len(rows),
            validation_rows=len(eval_rows), is_best=is_best, reason_code=r.reason_code, message=r.message,
        ), step=f":trial-{r.trial}")

    try:
        outcome = await run_search(recipe, planned, train_rows=len(rows), budget_s=tuning.budget_minutes * 60,
                                   work_dir=work_dir, control=control, train_trial=train_trial, on_trial=on_trial)
    finally:
        await emitter.close()
    best = outcome.best
    final = settings_of(recipe, best.settings) if best else recipe
    adopted = bool(best and await asyncio.to_thread(adopt_winner, work_dir, best.trial))  # best: a trial that scored
    log.info("tuning_winner", trial=best.trial if best else None, adopted_checkpoints=adopted)
    baseline = outcome.trials[0].metric if outcome.trials else None
    await ctx.emit(TuningCompleted(
        trials_run=len(outcome.trials), trials_planned=tuning.trials, budget_minutes=tuning.budget_minutes,
        stopped_by_budget=outcome.stopped_by_budget, best_trial=best.trial if best else None,
        best_settings=best.settings if best else planned[0], metric_name=best.metric_name if best else None,
        best_metric=best.metric if best else None, baseline_metric=baseline,
        final_from_trial=best.trial if adopted else None,
        wall_s=sum(r.wall_s for r in outcome.trials), train_sha256=p.train.sha256, validation_sha256=p.eval.sha256,
    ), step=":tuning-completed")
    return final
