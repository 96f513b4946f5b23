"""Export service: `eval.completed` -> the adapter as safetensors (and a classifier's merged model) with a
sha256 manifest, load-checked -> `export.completed` / `export.failed`."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from contracts import subjects
from contracts.events import ExportCompleted, ExportFailed, GateVerdict
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.models import resolve_base_model
from services.export.domain import ExportError, build_adapter_export, smoke_load, verify_export
from services.export.evidence import find_gate_verdict, find_lineage, gate_event_id
from services.export.settings import ExportSettings

EVALUATED = ConsumerSpec(service="export", durable="export-eval-completed",
                         subject=subjects.subject_for("eval.completed", kind="event"),
                         accepts=("eval.completed",), failure_type=ExportFailed, stage="export")


async def on_evaluated(ctx: StageContext) -> None:
    p = ctx.payload
    with tempfile.TemporaryDirectory(prefix="tuneline-export-") as tmp:
        try:
            adapter_dir = ctx.artifacts.materialize_dir(p.adapter, Path(tmp) / "adapter")
        except ArtifactIntegrityError as exc:
            raise StageError("export.artifact_unreadable", str(exc)) from exc
        out = Path(tmp) / "export"
        try:
            # merging loads the base model and runs it: off the event loop
            manifest = await asyncio.to_thread(
                build_adapter_export, adapter_dir, out, run_id=ctx.envelope.run_id, base_model=p.base_model,
                metrics={"candidate": p.candidate.model_dump(), "base": p.base.model_dump()},
                merge_from=resolve_base_model(p.base_model))
            problems = verify_export(out)
            if problems:
                raise ExportError("; ".join(problems))
            smoke_load(out)
        except ExportError as exc:
            raise StageError("export.smoke_failed", str(exc)) from exc
        export = ctx.artifacts.put_dir(out)
    gate = await find_gate_verdict(ctx.js, ctx.envelope.causation_id, ctx.raw.metadata.sequence.stream)
    dataset_version, dataset_manifest = await find_lineage(ctx.js, ctx.artifacts, ctx.envelope.causation_id,
                                                           ctx.raw.metadata.sequence.stream)
    if gate is None and p.gate_passed is not None and ctx.envelope.causation_id is not None:
        gate = GateVerdict(event_id=str(gate_event_id(ctx.envelope.causation_id)), passed=p.gate_passed,
                           test_set_sha256=p.test_set_sha256)
    await ctx.emit(ExportCompleted(
        plan=p.plan, base_model=p.base_model, export=export, format=manifest["format"],
        files={f["path"]: f["sha256"] for f in manifest["files"]}, candidate=p.candidate, base=p.base,
        # (v5) what the registry validates, smoke-checks and serves on (services/registry)
        gate=gate, records=p.records, test=p.eval if p.records is not None else None,
        test_set_sha256=p.test_set_sha256, label_space=p.label_space,
        dataset_version=dataset_version, manifest=dataset_manifest,  # lineage, from the run's training.completed
    ))


def build(settings: ExportSettings | None = None) -> Service:
    svc = Service("export", settings or ExportSettings())
    svc.consume(EVALUATED, on_evaluated)
    return svc


def main() -> None:
    build().run()
