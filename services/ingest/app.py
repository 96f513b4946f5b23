"""Ingest service.

- `run.start` / `ingest.commit` -> read the locator, map rows (given mapping, or introspection's
  confident proposal) -> `ingest.committed` / `ingest.failed`
- `ingest.introspect` -> `ingest.introspected` (shape hypotheses with confidence and rationale)
- `ingest.dry_run` -> `ingest.dry_run_completed` (counts, sample, every rejected row as an artifact)
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from contracts import subjects
from contracts.envelope import Severity
from contracts.events import CommittedRows, IngestCommitted, IngestDryRunCompleted, IngestFailed, IngestIntrospected
from services.common.app import Service
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.logging import get_logger
from services.ingest.domain import (
    IngestError,
    introspect_source,
    open_locator,
    plan_mapping,
    resolve_mapping,
    run_ingest,
    scrubbed_sample,
    storable,
)
from services.ingest.settings import IngestSettings
from services.ingest.sources.base import SourceError

log = get_logger(__name__)


def _spec(type_name: str, durable: str) -> ConsumerSpec:
    return ConsumerSpec(service="ingest", durable=durable, subject=subjects.subject_for(type_name, kind="command"),
                        accepts=(type_name,), failure_type=IngestFailed, stage="ingest")


START = _spec("run.start", "ingest-run-start")
COMMIT = _spec("ingest.commit", "ingest-commit")
INTROSPECT = _spec("ingest.introspect", "ingest-introspect")
DRY_RUN = _spec("ingest.dry_run", "ingest-dry-run")


def _settings(ctx: StageContext) -> IngestSettings:
    return ctx.settings  # type: ignore[return-value]


async def _in_thread(fn, *args, **kw):
    """Ingest work is blocking file or database I/O: run it off the event loop, as a StageError
    when it fails as a whole."""
    try:
        return await asyncio.to_thread(fn, *args, **kw)
    except (IngestError, SourceError) as exc:  # a source that fails as a whole: its reason, not retries
        raise StageError(exc.reason_code, str(exc)) from exc


async def on_start(ctx: StageContext) -> None:
    plan = ctx.payload.plan
    s = _settings(ctx)

    def work():
        source = open_locator(plan.locator, s.allowed_roots(), **s.limits())
        mapping, confidence = plan_mapping(source, plan)
        log.info("ingest_mapping", mapping=mapping.model_dump(exclude_defaults=True), confidence=confidence)
        outcome = run_ingest(source, mapping, ctx.artifacts, commit=True, default_provenance=plan.provenance)
        eval_outcome = None
        if plan.eval_locator:
            # The explicit eval set goes through the same mapping; prep checks it for overlap.
            eval_source = open_locator(plan.eval_locator, s.allowed_roots(), **s.limits())
            eval_outcome = run_ingest(eval_source, mapping, ctx.artifacts, commit=True,
                                      default_provenance=plan.provenance)
        return mapping, confidence, outcome, eval_outcome

    async with ctx.keep_alive():
        mapping, confidence, outcome, eval_outcome = await _in_thread(work)
    c = outcome.counts
    log.info("ingest_counted", rows_read=c.rows_read, rows_accepted=c.rows_accepted, rows_rejected=c.rows_rejected)
    if c.rows_accepted == 0:
        raise StageError("ingest.no_accepted_rows",
                         f"{c.rows_read} rows read from {plan.locator}, none accepted "
                         f"({outcome.rejected_by_reason}); rejected rows: {outcome.rejected.uri}")
    warning = outcome.warning or (eval_outcome.warning if eval_outcome else None)
    if warning:
        log.warning("ingest_source_warning", reason_code=warning, decoding=outcome.description.details.get("decoding"))
    await ctx.emit(IngestCommitted(
        plan=plan, dataset=outcome.dataset, rejected=outcome.rejected, rows_read=c.rows_read,
        rows_accepted=c.rows_accepted, rows_rejected=c.rows_rejected, rejected_by_reason=outcome.rejected_by_reason,
        mapping=mapping, mapping_confidence=confidence, source=_describe(outcome.description),
        eval_source=_committed(plan.eval_locator, eval_outcome) if eval_outcome else None,
    ), **({"severity": Severity.WARNING, "reason_code": warning} if warning else {}))


def _committed(locator: str, o) -> CommittedRows:
    if o.counts.rows_accepted == 0:
        raise StageError("ingest.no_accepted_rows", f"the eval dataset {locator} has no accepted row "
                                                    f"({o.rejected_by_reason}); rejected rows: {o.rejected.uri}")
    return CommittedRows(locator=locator, dataset=o.dataset, rejected=o.rejected, rows_read=o.counts.rows_read,
                         rows_accepted=o.counts.rows_accepted, rows_rejected=o.counts.rows_rejected,
                         rejected_by_reason=o.rejected_by_reason)


async def on_introspect(ctx: StageContext) -> None:
    cmd = ctx.payload
    s = _settings(ctx)

    def work():
        source = open_locator(cmd.locator, s.allowed_roots(), **s.limits())
        return source.describe(), introspect_source(source, cmd.sample_size)

    desc, found = await _in_thread(work)
    await ctx.emit(IngestIntrospected(
        locator=cmd.locator, source=_describe(desc), sample_rows=len(found.sample), fields=found.fields,
        hypotheses=found.hypotheses, auto_pick=found.auto_pick,
    ))


async def on_dry_run(ctx: StageContext) -> None:
    cmd = ctx.payload
    s = _settings(ctx)

    def work():
        source = open_locator(cmd.locator, s.allowed_roots(), **s.limits())
        mapping, _, _ = resolve_mapping(source, mapping=cmd.mapping, force=cmd.force)
        return mapping, run_ingest(source, mapping, ctx.artifacts, commit=False, sample_size=cmd.sample_size)

    async with ctx.keep_alive():
        mapping, outcome = await _in_thread(work)
    c = outcome.counts
    await ctx.emit(IngestDryRunCompleted(
        locator=cmd.locator, mapping=mapping, rows_read=c.rows_read, rows_accepted=c.rows_accepted,
        rows_rejected=c.rows_rejected, rejected_by_reason=outcome.rejected_by_reason,
        sample_accepted=scrubbed_sample(outcome.sample_accepted), rejected=outcome.rejected,
    ))


def _describe(desc) -> dict:
    """The source description as event data (it never holds a secret: see the sources; column names
    are the source's own, so storable)."""
    return storable({k: v for k, v in asdict(desc).items() if v not in (None, [], {})})


def build(settings: IngestSettings | None = None) -> Service:
    svc = Service("ingest", settings or IngestSettings())
    svc.consume(START, on_start)
    svc.consume(COMMIT, on_start)
    svc.consume(INTROSPECT, on_introspect)
    svc.consume(DRY_RUN, on_dry_run)
    return svc


def main() -> None:
    build().run()
