"""Prep service: `ingest.committed` -> clean, split, manifest -> `prep.cleaned` + `prep.prepared` / `prep.failed`."""

from __future__ import annotations

import asyncio

from contracts import subjects
from contracts.events import PrepCleaned, PrepFailed, PrepPrepared
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.logging import get_logger
from services.common.jsonl import read_jsonl
from services.prep.domain import InsufficientData, PrepBlocked, prepare
from services.prep.settings import PrepSettings

log = get_logger(__name__)

COMMITTED = ConsumerSpec(service="prep", durable="prep-ingest-committed",
                         subject=subjects.subject_for("ingest.committed", kind="event"),
                         accepts=("ingest.committed",), failure_type=PrepFailed, stage="prep")


def hosted_cost_basis(plan, settings: PrepSettings) -> tuple[str, int]:
    """The model and epochs the hosted cost estimate is for: the run's own hosted settings when it
    trains on a hosted backend (a run on gpt-4o was priced as gpt-4o-mini), else the service's defaults
    (what a hosted fine-tune of this dataset would cost by default)."""
    if plan.backend == "local" or plan.hosted is None:
        return settings.hosted_model, settings.hosted_epochs
    return plan.hosted.model, plan.hosted.n_epochs or settings.hosted_epochs


async def on_committed(ctx: StageContext) -> None:
    p = ctx.payload
    s: PrepSettings = ctx.settings  # type: ignore[assignment]
    plan = p.plan if p.plan.mapping or not p.mapping else p.plan.model_copy(update={"mapping": p.mapping})

    model, epochs = hosted_cost_basis(plan, s)

    def work():
        rows = read_jsonl(ctx.artifacts, p.dataset)
        eval_rows = read_jsonl(ctx.artifacts, p.eval_source.dataset) if p.eval_source else None
        return prepare(rows, plan, ctx.artifacts, eval_rows=eval_rows, base_policy=s.policy(),
                       source_sha256=p.dataset.sha256, hosted_model=model, hosted_epochs=epochs)

    try:
        async with ctx.keep_alive():
            out = await asyncio.to_thread(work)
    except ArtifactIntegrityError as exc:
        raise StageError("prep.artifact_unreadable", str(exc)) from exc
    except (InsufficientData, PrepBlocked) as exc:
        raise StageError(exc.reason_code, str(exc)) from exc
    c = out.cleaning
    await ctx.emit(PrepCleaned(
        plan=plan, rows_in=out.rows_in + out.manifest["counts"]["eval_rows_in"],
        rows_kept=out.train_rows + out.eval_rows, dropped_by_reason=out.dropped_by_reason, dropped=out.dropped,
        pii_by_kind={k: v for k, v in (c.get("pii_by_kind") or {}).items() if v},
        rows_with_pii=c.get("rows_with_pii", 0),
        stats={k: c[k] for k in ("outlier_share", "pii_row_share", "quality_histogram", "timings_s") if k in c},
    ))
    for w in out.warnings:
        log.warning("data_sufficiency", reason_code=w.reason_code, detail=w.message)
    await ctx.emit(PrepPrepared(
        plan=plan, manifest=out.manifest_ref, train=out.train, eval=out.eval, label_space=out.label_space,
        train_rows=out.train_rows, eval_rows=out.eval_rows, dataset_version=out.manifest["dataset_version"],
        duplicates_dropped=sum(v for k, v in out.dropped_by_reason.items()
                               if k in ("cleaning.exact_duplicate", "cleaning.near_duplicate", "cleaning.conflicting_labels")),
        openai_train=out.openai_train, openai_eval=out.openai_eval,
        token_estimate=out.cost.training_tokens if out.cost else None, cost_estimate=out.cost, warnings=out.warnings,
    ))


def build(settings: PrepSettings | None = None) -> Service:
    svc = Service("prep", settings or PrepSettings())
    svc.consume(COMMITTED, on_committed)
    return svc


def main() -> None:
    build().run()
