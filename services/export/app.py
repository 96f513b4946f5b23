"""Export service: `eval.completed` -> the adapter as safetensors plus the shape's other formats (merged,
ONNX fp32/int8 for encoders; merged, GGUF F32/Q8_0/Q4_K_M for chat models; services/export/formats.py),
each parity-checked in its own runtime on the test rows, with a sha256 manifest that pins the base model
-> `export.completed` (each format's outcome) / `export.failed`.

`export.run` (`tuneline export RUN --format onnx-int8`) exports a run's adapter again in other formats:
answered by `export.reexported` or `export.failed`."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import structlog

from contracts import subjects
from contracts.events import (
    EvalCompleted, ExportCompleted, ExportedFormat, ExportFailed, ExportReexported, GateVerdict)
from services.common.app import Service
from services.common.artifacts import ArtifactIntegrityError
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.jsonl import loads_jsonl
from services.common.models import resolve_base_model
from services.export import formats as F
from services.export.domain import (
    MANIFEST_FILE, ExportError, build_adapter_export, finish_manifest, smoke_load, verify_export)
from services.export.evidence import find_gate_verdict, find_lineage, find_run_event, gate_event_id
from services.export.settings import ExportSettings

log = structlog.get_logger()

EVALUATED = ConsumerSpec(service="export", durable="export-eval-completed",
                         subject=subjects.subject_for("eval.completed", kind="event"),
                         accepts=("eval.completed",), failure_type=ExportFailed, stage="export")
REEXPORT = ConsumerSpec(service="export", durable="export-run-command",
                        subject=subjects.subject_for("export.run", kind="command"),
                        accepts=("export.run",), failure_type=ExportFailed, stage="export")


def build_export(adapter_dir: Path, out: Path, rows: list[dict], *, run_id: str, base_model: str, metrics: dict,
                 formats: list[str] | None, max_accuracy_drop: float, pin: dict | None = None) -> dict:
    """The adapter, then each format, into `out`; returns the manifest (blocking: models load and run).
    `formats` None: the shape's formats. `pin`: the base model's pin from an earlier export, checked first.
    Raises StageError for what stops the whole export."""
    base_path = resolve_base_model(base_model)
    if pin is not None:
        why = F.base_model_changed(pin, base_path)
        if why is not None:
            raise StageError("export.base_model_changed", why)
    try:
        build_adapter_export(adapter_dir, out, run_id=run_id, base_model=base_model, metrics=metrics)
    except OSError as exc:
        err = F.storage_error(exc, f"export folder {out}")
        raise StageError(err.reason_code, str(err)) from exc
    try:
        ref = F.load_reference(adapter_dir, base_path, rows)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise StageError("export.smoke_failed", f"cannot load the adapter onto base model {base_model}: {exc}") from exc
    wanted = list(formats) if formats is not None else list(F.SHAPE_FORMATS[ref.shape])

    def logged(outcome: F.Outcome) -> None:
        if outcome.shipped:
            log.info("export_format_shipped", format=outcome.format, parity=outcome.parity)
        else:
            log.warning("export_format_failed", format=outcome.format, reason_code=outcome.reason_code,
                        error=outcome.message)

    outcomes = F.write_formats(ref, wanted, out, adapter_dir=adapter_dir, max_accuracy_drop=max_accuracy_drop,
                               on_outcome=logged)
    try:
        return finish_manifest(out, ref, outcomes, base_model=base_model, base_path=base_path)
    except OSError as exc:
        err = F.storage_error(exc, f"export folder {out}")
        raise StageError(err.reason_code, str(err)) from exc


def check_export(out: Path) -> None:
    try:
        problems = verify_export(out)
        if problems:
            raise ExportError("; ".join(problems))
        smoke_load(out)
    except ExportError as exc:
        raise StageError("export.smoke_failed", str(exc)) from exc


def work_folder(settings: ExportSettings) -> tempfile.TemporaryDirectory:
    """The temporary folder an export is assembled in (settings.work_dir, or the system's)."""
    try:
        return tempfile.TemporaryDirectory(prefix="tuneline-export-", dir=settings.work_dir)
    except OSError as exc:
        err = F.storage_error(exc, f"export work folder {settings.work_dir}")
        raise StageError(err.reason_code, str(err)) from exc


def smoke_rows(ctx: StageContext, ref, limit: int) -> list[dict]:
    try:
        return loads_jsonl(ctx.artifacts.read_bytes(ref))[:limit]
    except (ArtifactIntegrityError, OSError, ValueError) as exc:
        raise StageError("export.artifact_unreadable", f"the test rows to smoke-check on: {exc}") from exc


def store(ctx: StageContext, out: Path):
    """The finished export folder into the artifact store (atomic per object: nothing half-written under a
    content address)."""
    try:
        return ctx.artifacts.put_dir(out)
    except OSError as exc:
        err = F.storage_error(exc, f"artifact store {ctx.artifacts.root}")
        raise StageError(err.reason_code, str(err)) from exc


async def export_adapter(ctx: StageContext, p: EvalCompleted, formats: list[str] | None, pin: dict | None = None,
                         run_id: str | None = None):
    """(the stored export's ref, its manifest) for the evaluated run `p` (`run_id`: the trigger's run)."""
    settings: ExportSettings = ctx.settings
    if p.adapter is None:
        raise StageError("export.artifact_unreadable", "the evaluation names no adapter to export")
    rows = smoke_rows(ctx, p.eval, settings.smoke_rows)
    with work_folder(settings) as tmp:
        try:
            adapter_dir = ctx.artifacts.materialize_dir(p.adapter, Path(tmp) / "adapter")
        except ArtifactIntegrityError as exc:
            raise StageError("export.artifact_unreadable", str(exc)) from exc
        except OSError as exc:
            err = F.storage_error(exc, f"export work folder {tmp}")
            raise StageError(err.reason_code, str(err)) from exc
        out = Path(tmp) / "export"
        # loading, converting and running models: off the event loop
        manifest = await asyncio.to_thread(
            build_export, adapter_dir, out, rows, run_id=run_id or ctx.envelope.run_id, base_model=p.base_model,
            metrics={"candidate": p.candidate.model_dump(), "base": p.base.model_dump()}, formats=formats,
            max_accuracy_drop=settings.max_quantized_accuracy_drop, pin=pin)
        check_export(out)
        return store(ctx, out), manifest


def event_formats(manifest: dict) -> list[ExportedFormat]:
    """The manifest's format outcomes as the events carry them (the writers' details stay in the manifest)."""
    keys = ExportedFormat.model_fields
    return [ExportedFormat(**{k: v for k, v in f.items() if k in keys}) for f in manifest["formats"]]


async def on_evaluated(ctx: StageContext) -> None:
    p = ctx.payload
    export, manifest = await export_adapter(ctx, p, list(ctx.settings.formats) if ctx.settings.formats else None)
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
        formats=event_formats(manifest), base_model_sha256=manifest["base"]["weights_sha256"],  # (v6)
    ))


async def on_export_command(ctx: StageContext) -> None:
    """Export an earlier run again in the formats asked for (`tuneline export RUN --format ...`)."""
    run_id = ctx.payload.run_id
    seq = ctx.raw.metadata.sequence.stream
    found = await find_run_event(ctx.js, "eval.completed", run_id, seq)
    if found is None or found[1].adapter is None:
        raise StageError("export.run_unknown", f"run {run_id} has no recorded evaluation with an adapter to export")
    p: EvalCompleted = found[1]
    from services.common.classifier_inference import trained_metadata

    pin = await earlier_pin(ctx, run_id, seq)
    with work_folder(ctx.settings) as tmp:
        try:
            meta = trained_metadata(ctx.artifacts.materialize_dir(p.adapter, Path(tmp) / "a"))
        except (ArtifactIntegrityError, OSError) as exc:
            raise StageError("export.artifact_unreadable", str(exc)) from exc
    shape = F.shape_of(meta)
    unknown = F.check_formats(shape, ctx.payload.formats)
    if unknown:
        raise StageError("export.format_unknown", "; ".join(unknown))
    export, manifest = await export_adapter(ctx, p, list(ctx.payload.formats), pin=pin, run_id=run_id)
    asked = [f for f in manifest["formats"] if f["format"] in ctx.payload.formats]
    if asked and not any(f["status"] == "shipped" for f in asked):
        first = asked[0]
        raise StageError(first["reason_code"] or "export.smoke_failed",
                         "; ".join(f"{f['format']}: {f['message']}" for f in asked))
    await ctx.emit(ExportReexported(
        source_run_id=run_id, base_model=p.base_model, export=export, files={f["path"]: f["sha256"] for f in manifest["files"]},
        formats=event_formats(manifest), requested=list(ctx.payload.formats),
        base_model_sha256=manifest["base"]["weights_sha256"], source=p.adapter))


async def earlier_pin(ctx: StageContext, run_id: str, before_seq: int) -> dict | None:
    """The base model pin in the run's latest export manifest (export.completed or export.reexported)."""
    for type_name in ("export.reexported", "export.completed"):
        found = await find_run_event(ctx.js, type_name, run_id, before_seq)
        if found is None:
            continue
        with tempfile.TemporaryDirectory(prefix="tuneline-pin-", dir=ctx.settings.work_dir) as tmp:
            try:
                d = ctx.artifacts.materialize_dir(found[1].export, Path(tmp) / "x")
                pin = json.loads((d / MANIFEST_FILE).read_text()).get("base")
            except (ArtifactIntegrityError, OSError, ValueError):
                pin = None
            finally:
                shutil.rmtree(Path(tmp) / "x", ignore_errors=True)
        if pin:
            return pin
    return None


def build(settings: ExportSettings | None = None) -> Service:
    svc = Service("export", settings or ExportSettings())
    svc.consume(EVALUATED, on_evaluated)
    svc.consume(REEXPORT, on_export_command)
    return svc


def main() -> None:
    build().run()
