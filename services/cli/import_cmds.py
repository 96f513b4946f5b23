"""`tuneline import openai-jobs`: keep the record of fine-tuning jobs trained on OpenAI (or an OpenAI-compatible
host) before the provider drops it: each job not yet imported becomes an imported run in the audit trail.

Each job's run (`import-<host>-<job id>`) holds its job object, its provider events, and its archive (checkpoints
with their metrics, the training, validation and result files downloaded into the artifact store where the
provider still serves them), as services/trainer/hosted/archive.py builds them. Idempotent: a job whose archive
is recorded in run_events is skipped, and every event id derives from the run's name, so a job imported again
before the recorder caught up publishes the same ids (deduplicated by the bus and by run_events).

With --target, a succeeded job is registered as a version of the target (`registry.hosted_version_registered`,
its lineage the training file's sha256), appended to the target's log with the registry's own expected-sequence
append (services.registry.app.append_registration), caused by the job's archive event so it registers once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys

from contracts import subjects
from contracts.envelope import Envelope
from contracts.events import HostedVersionRegistered
from contracts.registry import message_type_of
from services.common.artifacts import ArtifactStore
from services.trainer.hosted.archive import ImportedJob, ImportReport, host_of, import_event_id, import_jobs, lineage
from services.trainer.hosted.base import HostedTrainingError


def add_parser(sub, main) -> None:
    imp = sub.add_parser("import", help="import history kept elsewhere into the audit trail")
    isub = imp.add_subparsers(dest="import_command", required=True)
    o = isub.add_parser("openai-jobs", help="archive past fine-tuning jobs (events, checkpoints, files) as imported runs")
    o.add_argument("--api-key-env", default="OPENAI_API_KEY", help="the environment variable holding the API key")
    o.add_argument("--base-url", default=None, help="an OpenAI-compatible host (default: api.openai.com)")
    o.add_argument("--since", default=None, metavar="DATE", help="only jobs created on or after DATE (YYYY-MM-DD, UTC)")
    o.add_argument("--target", default=None, help="register each succeeded job as a version of this target")
    o.add_argument("--json", action="store_true", help="the summary as JSON")
    o.set_defaults(fn=lambda a: cmd_import_openai_jobs(main, a))


def make_backend(args):
    """The provider client (a seam for tests, which point it at a fake of the documented API)."""
    from services.trainer.hosted.openai_backend import OpenAIHostedBackend

    provider = "openai" if args.base_url is None else "openai-compatible"
    return OpenAIHostedBackend(api_key_env=args.api_key_env, base_url=args.base_url, provider=provider)


def parse_since(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        day = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"--since {text!r}: expected a date, YYYY-MM-DD") from None
    if day.tzinfo is None:
        day = day.replace(tzinfo=dt.timezone.utc)
    return int(day.timestamp())


def envelope(run_id: str, payload, step: str = "", *, causation=None) -> Envelope:
    mt = message_type_of(payload)
    return Envelope(event_id=import_event_id(run_id, mt.name, step), type=mt.name, schema_version=mt.version,
                    run_id=run_id, correlation_id=run_id, causation_id=causation, producer="cli",
                    payload=payload.model_dump(mode="json"))


async def already_imported(main, host: str) -> set[str]:
    """The imported runs of this host whose archive event is recorded."""
    conn = await main._db(main.urls()[1])
    try:
        rows = await conn.fetch("SELECT DISTINCT run_id FROM run_events WHERE type = 'training.provider_archived' "
                                "AND run_id LIKE $1", f"import-{host}-%")
    finally:
        await conn.close()
    return {r["run_id"] for r in rows}


async def run_import(main, args, backend, *, progress=None) -> ImportReport:
    from services.common.bus import publish
    from services.registry.app import append_registration

    since = parse_since(args.since)
    host = host_of(backend.base_url)
    done = await already_imported(main, host)
    nats_url, _ = main.urls()
    nc, js = await main._js(nats_url)
    store = ArtifactStore(main.data_dir() / "artifacts")

    async def publish_job(job: ImportedJob) -> None:
        for payload, step in job.events:  # the archive event last: a job counts as imported once it is published
            env = envelope(job.run_id, payload, step)
            await publish(js, env, subjects.subject_for(env.type, kind="event"))

    async def register(job: ImportedJob) -> int:
        archived = job.archived
        cause = import_event_id(job.run_id, "training.provider_archived")
        return await append_registration(js, args.target, str(cause), lambda version: envelope(
            job.run_id, HostedVersionRegistered(
                target=args.target, version=version, provider=archived.provider, hosted_job_id=archived.hosted_job_id,
                base_model=archived.base_model, fine_tuned_model=archived.fine_tuned_model,
                training_file_sha256=lineage(archived, "training"), validation_file_sha256=lineage(archived, "validation"),
                source_run_id=job.run_id), f":{args.target}", causation=cause))

    task = None

    def on_found(n: int) -> None:
        nonlocal task
        if progress is not None:
            task = progress.add_task("importing jobs", total=n)

    def on_done(job_id: str, outcome: str) -> None:
        if progress is not None and task is not None:
            progress.update(task, advance=1, description=f"{job_id}: {outcome}")

    try:
        return await import_jobs(backend, store, host=host, already_imported=done, publish=publish_job, since=since,
                                 register=register if args.target else None, on_found=on_found, on_done=on_done)
    finally:
        await nc.close()


def report_json(report: ImportReport) -> dict:
    return {"found": report.found, "imported": report.imported, "skipped_already_imported": report.skipped,
            "failed": [{"job_id": j, "reason_code": c, "message": m} for j, c, m in report.failed],
            "registered": [{"job_id": j, "version": v} for j, v in report.registered],
            "events_archived": report.events_archived, "checkpoints": report.checkpoints,
            "files_kept": report.files_kept,
            "files_unavailable": [{"job_id": j, "file_id": f} for j, f in report.files_unavailable]}


def print_summary(console, report: ImportReport, target: str | None) -> None:
    from rich.table import Table

    t = Table(title="tuneline import openai-jobs")
    for col in ("jobs found", "imported", "skipped (already imported)", "failed", "registered"):
        t.add_column(col, justify="right")
    t.add_row(str(report.found), str(len(report.imported)), str(len(report.skipped)), str(len(report.failed)),
              f"{len(report.registered)}" + (f" to {target}" if target else ""))
    console.print(t)
    console.print(f"archived {report.events_archived} provider events, {report.checkpoints} checkpoints, "
                  f"{report.files_kept} files; files no longer served by the provider: {len(report.files_unavailable)}",
                  soft_wrap=True)
    for job_id, file_id in report.files_unavailable:
        console.print(f"  {job_id}: file {file_id} unavailable (training.provider_file_unavailable)", soft_wrap=True)
    for job_id, version in report.registered:
        console.print(f"  {job_id}: registered {target} v{version}", soft_wrap=True)
    if report.failed:
        f = Table(title="failed (left for the next run)")
        for col in ("job", "reason", "message"):
            f.add_column(col)
        for job_id, code, message in report.failed:
            f.add_row(job_id, code, message[:300])
        console.print(f)


def cmd_import_openai_jobs(main, args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if args.target is not None and not subjects.is_subject_token(args.target):
        print(f"--target {args.target!r}: a target is a subject token ([A-Za-z0-9_-]+)", file=sys.stderr)
        return 2
    parse_since(args.since)
    try:
        backend = make_backend(args)
    except HostedTrainingError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as progress:
            report = asyncio.run(run_import(main, args, backend, progress=progress))
    except HostedTrainingError as exc:  # the listing itself failed (the provider kept refusing)
        print(f"import stopped: {exc.message}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print_summary(Console(), report, args.target)
    return 1 if report.failed else 0
