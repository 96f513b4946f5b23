"""Export service: `eval.completed` -> the adapter as safetensors with a sha256 manifest, load-checked
-> `export.completed` / `export.failed`."""

from __future__ import annotations

import tempfile
from pathlib import Path

from contracts import subjects
from contracts.events import ExportCompleted, ExportFailed
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.export.domain import ExportError, build_adapter_export, smoke_load, verify_export
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
            manifest = build_adapter_export(adapter_dir, out, run_id=ctx.envelope.run_id, base_model=p.base_model,
                                            metrics={"candidate": p.candidate.model_dump(), "base": p.base.model_dump()})
            problems = verify_export(out)
            if problems:
                raise ExportError("; ".join(problems))
            smoke_load(out)
        except ExportError as exc:
            raise StageError("export.smoke_failed", str(exc)) from exc
        export = ctx.artifacts.put_dir(out)
    await ctx.emit(ExportCompleted(
        plan=p.plan, base_model=p.base_model, export=export, format=manifest["format"],
        files={f["path"]: f["sha256"] for f in manifest["files"]}, candidate=p.candidate, base=p.base,
    ))


def build(settings: ExportSettings | None = None) -> Service:
    svc = Service("export", settings or ExportSettings())
    svc.consume(EVALUATED, on_evaluated)
    return svc


def main() -> None:
    build().run()
