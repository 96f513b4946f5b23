"""Ingest service: `run.start` -> read the locator, map rows -> `ingest.committed` / `ingest.failed`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from contracts import subjects
from contracts.events import IngestCommitted, IngestFailed
from services.common.app import Service
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.jsonl import dumps_jsonl
from services.ingest.domain import LocatorError, MappingResult, jsonl_rows, map_rows, parse_locator
from services.ingest.settings import IngestSettings

START = ConsumerSpec(service="ingest", durable="ingest-run-start", subject=subjects.subject_for("run.start", kind="command"),
                     accepts=("run.start",), failure_type=IngestFailed, stage="ingest")


def read_and_map(path: Path, text_field: str, label_field: str) -> MappingResult:
    with open(path, "rb") as f:
        return map_rows(jsonl_rows(f), text_field, label_field)


async def on_start(ctx: StageContext) -> None:
    plan = ctx.payload.plan
    try:
        locator = parse_locator(plan.locator)
    except LocatorError as exc:
        raise StageError(exc.reason_code, str(exc)) from exc
    if not locator.path.is_file():
        raise StageError("ingest.source_not_found", f"locator {plan.locator!r}: {locator.path} does not exist or is not a file")
    try:
        result = await asyncio.to_thread(read_and_map, locator.path, plan.text_field, plan.label_field)
    except OSError as exc:
        raise StageError("ingest.source_not_found", f"locator {plan.locator!r}: cannot read {locator.path}: {exc}") from exc
    rejected = ctx.artifacts.put_bytes(dumps_jsonl(r.as_json() for r in result.rejected))
    if not result.accepted:
        raise StageError("ingest.no_accepted_rows",
                         f"{result.rows_read} rows read from {locator.path}, none accepted "
                         f"({result.rejected_by_reason}); rejected rows: {rejected.uri}")
    dataset = ctx.artifacts.put_bytes(dumps_jsonl(result.accepted))
    await ctx.emit(IngestCommitted(
        plan=plan, dataset=dataset, rejected=rejected, rows_read=result.rows_read,
        rows_accepted=len(result.accepted), rows_rejected=len(result.rejected),
        rejected_by_reason=result.rejected_by_reason,
    ))


def build(settings: IngestSettings | None = None) -> Service:
    svc = Service("ingest", settings or IngestSettings())
    svc.consume(START, on_start)
    return svc


def main() -> None:
    build().run()
