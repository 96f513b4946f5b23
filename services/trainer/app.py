"""Trainer service: `prep.prepared` -> LoRA fine-tune -> `training.started/progress/completed` / `training.failed`."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import asdict
from pathlib import Path

from contracts import subjects
from contracts.common import CLASSIFICATION_SHAPES
from contracts.events import TrainingCompleted, TrainingFailed, TrainingProgressed, TrainingStarted
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.jsonl import loads_jsonl
from services.common.logging import get_logger
from services.trainer.adapters.lora import (
    ClassificationRecipe,
    TrainingDiverged,
    TrainingProgress,
    default_base_model,
    train_sequence_classifier,
)
from services.trainer.settings import TrainerSettings

log = get_logger(__name__)

PREPARED = ConsumerSpec(service="trainer", durable="trainer-prep-prepared",
                        subject=subjects.subject_for("prep.prepared", kind="event"),
                        accepts=("prep.prepared",), failure_type=TrainingFailed, stage="trainer")


def recipe_for(plan) -> ClassificationRecipe:
    return ClassificationRecipe(
        base_model=plan.base_model or default_base_model(), max_steps=plan.max_steps, batch_size=plan.batch_size,
        learning_rate=plan.learning_rate, max_length=plan.max_length, seed=plan.seed,
    )


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, TrainingDiverged):
        return "training.diverged"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "training.oom"
    if isinstance(exc, OSError):
        return "training.base_model_unavailable"
    return "training.runtime_error"


def make_on_prepared(settings: TrainerSettings):
    async def on_prepared(ctx: StageContext) -> None:
        p = ctx.payload
        shape = p.plan.mapping.shape if p.plan.mapping else "single_label_classification"
        if shape not in CLASSIFICATION_SHAPES:
            raise StageError("training.capability_unsupported",
                             f"the local trainer fine-tunes classifiers; a {shape} dataset needs the chat SFT recipe, "
                             f"which is not available yet")
        try:
            rows = loads_jsonl(ctx.artifacts.read_bytes(p.train))
        except ArtifactIntegrityError as exc:
            raise StageError("training.runtime_error", f"train split unreadable: {exc}") from exc
        recipe = recipe_for(p.plan)
        await ctx.emit(TrainingStarted(plan=p.plan, base_model=recipe.base_model, max_steps=recipe.max_steps,
                                       train_rows=len(rows)))
        loop = asyncio.get_running_loop()
        emitted: list = []

        def on_progress(pr: TrainingProgress) -> None:
            # Called from the training thread: hand the event to the loop, wait for it at the end.
            event = TrainingProgressed(**asdict(pr))  # the contract mirrors the adapter's report
            emitted.append(asyncio.run_coroutine_threadsafe(ctx.emit(event, step=f":{pr.step}"), loop))

        every = max(1, recipe.max_steps // max(1, settings.progress_events))
        with tempfile.TemporaryDirectory(prefix="tuneline-train-") as tmp:
            try:
                async with ctx.keep_alive():
                    result = await asyncio.to_thread(
                        train_sequence_classifier, [r["text"] for r in rows], [r["label"] for r in rows],
                        p.label_space, recipe, Path(tmp) / "adapter", on_progress, every,
                    )
            except Exception as exc:  # noqa: BLE001 - a training error is the run's failure, not a bus retry
                raise StageError(failure_reason(exc), f"{type(exc).__name__}: {exc}") from exc
            finally:
                for fut in emitted:
                    await asyncio.wrap_future(fut)
            adapter = ctx.artifacts.put_dir(result.adapter_dir)
        log.info("training_done", steps=result.steps, wall_s=round(result.wall_s, 2), final_loss=result.final_loss)
        await ctx.emit(TrainingCompleted(
            plan=p.plan, base_model=recipe.base_model, adapter=adapter, manifest=p.manifest, eval=p.eval,
            label_space=p.label_space, steps=result.steps, final_loss=result.final_loss,
            examples_per_s=result.examples_per_s, wall_s=result.wall_s,
        ))

    return on_prepared


def build(settings: TrainerSettings | None = None) -> Service:
    settings = settings or TrainerSettings()
    svc = Service("trainer", settings)
    svc.consume(PREPARED, make_on_prepared(settings))
    return svc


def main() -> None:
    build().run()
