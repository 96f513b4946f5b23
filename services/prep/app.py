"""Prep service: `ingest.committed` -> dedup, stratified split, manifest -> `prep.prepared` / `prep.failed`."""

from __future__ import annotations

import json

from contracts import subjects
from contracts.events import PrepFailed, PrepPrepared
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.jsonl import dumps_jsonl, loads_jsonl
from services.prep.domain import InsufficientData, manifest, stratified_split
from services.prep.settings import PrepSettings

COMMITTED = ConsumerSpec(service="prep", durable="prep-ingest-committed",
                         subject=subjects.subject_for("ingest.committed", kind="event"),
                         accepts=("ingest.committed",), failure_type=PrepFailed, stage="prep")


async def on_committed(ctx: StageContext) -> None:
    p = ctx.payload
    try:
        rows = loads_jsonl(ctx.artifacts.read_bytes(p.dataset))
    except ArtifactIntegrityError as exc:
        raise StageError("prep.artifact_unreadable", str(exc)) from exc
    try:
        split = stratified_split(rows, p.plan.eval_fraction, p.plan.seed)
    except InsufficientData as exc:
        raise StageError(exc.reason_code, str(exc)) from exc
    train = ctx.artifacts.put_bytes(dumps_jsonl(split.train))
    eval_ = ctx.artifacts.put_bytes(dumps_jsonl(split.eval))
    m = manifest(split, source_sha256=p.dataset.sha256, train_sha256=train.sha256, eval_sha256=eval_.sha256,
                 rows_in=len(rows))
    manifest_ref = ctx.artifacts.put_bytes(json.dumps(m, indent=1, sort_keys=True).encode())
    await ctx.emit(PrepPrepared(
        plan=p.plan, manifest=manifest_ref, train=train, eval=eval_, label_space=m["label_space"],
        train_rows=len(split.train), eval_rows=len(split.eval), dataset_version=m["dataset_version"],
        duplicates_dropped=split.duplicates_dropped + split.conflicting_labels_dropped,
    ))


def build(settings: PrepSettings | None = None) -> Service:
    svc = Service("prep", settings or PrepSettings())
    svc.consume(COMMITTED, on_committed)
    return svc


def main() -> None:
    build().run()
