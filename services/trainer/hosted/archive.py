"""The hosted job archive: what a provider knows about a fine-tuning job, kept as events of the audit spine (D12).

A job's record lives at the provider: its raw events, its checkpoints with their metrics, its result files, and
the job object (hyperparameters, trained tokens, error). Providers drop them (files expire or are deleted, a
provider winds its fine-tuning down), so Tuneline copies them while it can:

- `training.provider_event`: the provider's job events, in batches (ProviderEventBatcher says how and why);
- `training.provider_job`: the job object each time its status changes (JobSnapshots);
- `training.provider_archived`: last, the checkpoints (every metric) and the files: result files downloaded into
  the artifact store when the job succeeded; training and validation files by their artifact (a Tuneline run
  uploaded them from its own artifacts) or downloaded (an imported job), so their sha256 is the lineage.

Events rather than one archive artifact referenced from `training.completed`: each batch is on the bus while the
job runs, so a trainer that dies mid-job has lost nothing already seen; a failed or cancelled job (whose events
explain why) has an archive too, though it has no `training.completed`; and the archive is queryable in
run_events by type, deduplicated by the same three layers as every event (D3).

The same events make up an imported run (`tuneline import openai-jobs`, `import_job` / `import_jobs`): one run
per provider job, named by the host and the job id, whose event ids derive from that name, so importing twice
publishes the same ids, and a job whose archive is recorded is skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from contracts.events import (
    Notice,
    ProviderCheckpoint,
    ProviderEventsArchived,
    ProviderFile,
    ProviderJobArchived,
    ProviderJobEvent,
    ProviderJobObserved,
)
from services.common.artifacts import ArtifactStore
from services.common.ids import TUNELINE_NAMESPACE, derived_event_id
from services.common.logging import get_logger
from services.trainer.hosted.base import HostedEvent, HostedTrainingError

log = get_logger(__name__)

BATCH_SIZE = 50        # provider events per training.provider_event
MAX_MESSAGE = 4000     # characters of one provider event's message kept (a batch stays far below max_payload)
FILE_UNAVAILABLE = "training.provider_file_unavailable"
# Job fields that change between two polls without the job changing (OpenAI's estimate of its finish time).
_VOLATILE = ("estimated_finish",)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- provider events -------------------------------------------------------------------------


def archived_event(ev: HostedEvent) -> ProviderJobEvent:
    message = ev.message if len(ev.message) <= MAX_MESSAGE else ev.message[:MAX_MESSAGE] + " [truncated]"
    return ProviderJobEvent(id=ev.id, created_at=ev.created_at, level=ev.level, message=message, type=ev.type,
                            data=dict(ev.data) if ev.data is not None else None)


class ProviderEventBatcher:
    """Cuts a job's provider events (delivered oldest first, each once) into `training.provider_event` batches.

    Batched: a long job reports a metrics event every step; one envelope per provider event would add a
    stream message and a run_events row per step on top of `training.progress`. A batch holds BATCH_SIZE events.

    Deduplicated by the provider's event ids: a batch closes after BATCH_SIZE events counted from the job's first
    event, or when the job has ended (`flush`), never when a poll happened to return. So every follow of one
    job cuts the same batches (a redelivered trigger follows the job from its first event again), and a batch's
    event id derives from the provider ids of its first and last events (`step`): the same batch gets the same
    id, which the bus (Nats-Msg-Id) and run_events (UNIQUE event_id) take once. Events after the last full batch
    of a job that did not end (a trainer that timed out) are not archived by that run; `tuneline import
    openai-jobs` archives the whole job later.
    """

    def __init__(self, provider: str, job_id: str, size: int = BATCH_SIZE) -> None:
        self.provider, self.job_id, self.size = provider, job_id, size
        self._pending: list[ProviderJobEvent] = []
        self.archived = 0

    def add(self, ev: HostedEvent) -> ProviderEventsArchived | None:
        self._pending.append(archived_event(ev))
        return self._cut() if len(self._pending) >= self.size else None

    def flush(self) -> ProviderEventsArchived | None:
        return self._cut() if self._pending else None

    def _cut(self) -> ProviderEventsArchived:
        batch, self._pending = self._pending, []
        self.archived += len(batch)
        return ProviderEventsArchived(provider=self.provider, hosted_job_id=self.job_id, events=batch)

    @staticmethod
    def step(batch: ProviderEventsArchived) -> str:
        return f":{batch.hosted_job_id}:{batch.events[0].id}:{batch.events[-1].id}"


# --- job snapshots ---------------------------------------------------------------------------


class JobSnapshots:
    """The job object each time its status changes (the first poll counts as a change)."""

    def __init__(self, provider: str, job_id: str) -> None:
        self.provider, self.job_id = provider, job_id
        self._status: str | None = None
        self.last: dict[str, Any] | None = None

    def observe(self, job: Mapping[str, Any]) -> ProviderJobObserved | None:
        self.last = dict(job)
        status = str(job.get("status"))
        if status == self._status:
            return None
        self._status = status
        return ProviderJobObserved(provider=self.provider, hosted_job_id=self.job_id, status=status, job=dict(job))

    @staticmethod
    def step(snapshot: ProviderJobObserved) -> str:
        """Named by the job's content apart from its volatile fields: a redelivery that sees the job as it was
        reuses the id; a job that changed is a new snapshot."""
        stable = {k: v for k, v in snapshot.job.items() if k not in _VOLATILE}
        return f":{snapshot.hosted_job_id}:{snapshot.status}:{_digest(stable)}"


# --- checkpoints and files -------------------------------------------------------------------


def checkpoints_from(records: Iterable[Mapping[str, Any]]) -> list[ProviderCheckpoint]:
    out = []
    for c in records:
        metrics = c.get("metrics")
        out.append(ProviderCheckpoint(id=str(c["id"]), step=int(c.get("step_number") or 0),
                                      fine_tuned_model_checkpoint=str(c.get("fine_tuned_model_checkpoint") or ""),
                                      created_at=c.get("created_at"),
                                      metrics=dict(metrics) if isinstance(metrics, Mapping) else {}))
    return sorted(out, key=lambda c: c.step)


def job_files(job: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, file id) of every file the job names."""
    out = []
    for role, key in (("training", "training_file"), ("validation", "validation_file")):
        if job.get(key):
            out.append((role, str(job[key])))
    out.extend(("result", str(f)) for f in job.get("result_files") or ())
    return out


def download(backend: Any, store: ArtifactStore, role: str, file_id: str) -> ProviderFile:
    """The file's object and content into the artifact store. A file the provider no longer serves (404, or any
    other refusal) is recorded as unavailable with its reason; a retryable failure (rate limit or connection
    after the SDK's retries) propagates, so the caller tries again later rather than recording a loss."""
    try:
        info = backend.file_info(file_id)
    except HostedTrainingError as exc:
        if exc.retryable:
            raise
        return _unavailable(role, file_id, exc)
    base = dict(role=role, file_id=file_id, filename=info.get("filename"), size=info.get("bytes"),
                purpose=info.get("purpose"))
    writer = store.writer()
    try:
        backend.download_file(file_id, writer.write)
        ref = writer.commit()
    except HostedTrainingError as exc:
        writer.discard()
        if exc.retryable:
            raise
        return _unavailable(role, file_id, exc, **base)
    except BaseException:
        writer.discard()
        raise
    return ProviderFile(**base, artifact=ref)


def _unavailable(role: str, file_id: str, exc: HostedTrainingError, **known: Any) -> ProviderFile:
    gone = "deleted or expired" if exc.status == 404 else "refused"
    known = {"role": role, "file_id": file_id, **known}
    return ProviderFile(**known, unavailable=Notice(reason_code=FILE_UNAVAILABLE,
                                                    message=f"{role} file {file_id} {gone}: {exc.message}"[:2000]))


def archive_record(provider: str, job: Mapping[str, Any], *, events_archived: int,
                   checkpoints: list[ProviderCheckpoint], files: list[ProviderFile], imported: bool) -> ProviderJobArchived:
    return ProviderJobArchived(
        provider=provider, hosted_job_id=str(job["id"]), status=str(job.get("status")),
        base_model=str(job.get("model") or ""), fine_tuned_model=job.get("fine_tuned_model"),
        trained_tokens=job.get("trained_tokens"), created_at=job.get("created_at"), finished_at=job.get("finished_at"),
        events_archived=events_archived, checkpoints=checkpoints, files=files, imported=imported)


def lineage(archived: ProviderJobArchived, role: str) -> str | None:
    """The sha256 of the job's training (or validation) file, where a copy was kept."""
    for f in archived.files:
        if f.role == role and f.artifact is not None:
            return f.artifact.sha256
    return None


# --- imported runs ---------------------------------------------------------------------------


def host_of(base_url: str) -> str:
    return urlparse(base_url).hostname or "unknown-host"


def imported_run_id(host: str, job_id: str) -> str:
    """One run per provider job: named by the host (job ids are unique per host only) and the job id."""
    return f"import-{host}-{job_id}"[:128]


def import_trigger(run_id: str) -> uuid.UUID:
    """What the ids of an imported run's events derive from (D3), as a trigger event's id would."""
    return uuid.uuid5(TUNELINE_NAMESPACE, f"import:{run_id}")


def import_event_id(run_id: str, type_name: str, step: str = "") -> uuid.UUID:
    return derived_event_id(import_trigger(run_id), f"import/{type_name}{step}")


@dataclass
class ImportedJob:
    """One job's imported history: the payloads to publish, in order, each with its step (its id's suffix)."""

    run_id: str
    job_id: str
    events: list[tuple[Any, str]] = field(default_factory=list)
    archived: ProviderJobArchived | None = None


def import_job(backend: Any, store: ArtifactStore, job: Any, host: str) -> ImportedJob:
    """A past job's whole history as the events of its imported run (synchronous: provider I/O)."""
    provider = backend.provider
    snapshot = backend.job_json(job)
    run_id = imported_run_id(host, str(snapshot["id"]))
    out = ImportedJob(run_id=run_id, job_id=str(snapshot["id"]))
    observed = JobSnapshots(provider, out.job_id).observe(snapshot)
    out.events.append((observed, JobSnapshots.step(observed)))
    batcher = ProviderEventBatcher(provider, out.job_id)
    for ev in backend.job_events(out.job_id):
        if (batch := batcher.add(ev)) is not None:
            out.events.append((batch, ProviderEventBatcher.step(batch)))
    if (batch := batcher.flush()) is not None:
        out.events.append((batch, ProviderEventBatcher.step(batch)))
    checkpoints = checkpoints_from(backend.checkpoint_records(out.job_id))
    files = [download(backend, store, role, fid) for role, fid in job_files(snapshot)]
    out.archived = archive_record(provider, snapshot, events_archived=batcher.archived, checkpoints=checkpoints,
                                  files=files, imported=True)
    out.events.append((out.archived, ""))
    return out


@dataclass
class ImportReport:
    found: int = 0
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (job id, reason code, message)
    registered: list[tuple[str, int]] = field(default_factory=list)  # (job id, version)
    events_archived: int = 0
    checkpoints: int = 0
    files_kept: int = 0
    files_unavailable: list[tuple[str, str]] = field(default_factory=list)  # (job id, file id)


Publish = Callable[[ImportedJob], Awaitable[None]]
Register = Callable[[ImportedJob], Awaitable[int | None]]


async def import_jobs(backend: Any, store: ArtifactStore, *, host: str, already_imported: set[str], publish: Publish,
                      since: int | None = None, register: Register | None = None,
                      on_found: Callable[[int], None] | None = None,
                      on_done: Callable[[str, str], None] | None = None) -> ImportReport:
    """List the jobs (newest first), then import each one whose run is not in `already_imported`.

    `publish` puts a job's events on the bus; `register` (with --target) registers a succeeded job and returns
    its version. A job that fails (the provider keeps refusing, a listing that cannot resume) is reported with
    its reason and left for the next run: nothing of it is marked imported until its archive event is published.
    """
    report = ImportReport()
    jobs = await asyncio.to_thread(lambda: list(backend.list_jobs(since=since)))
    report.found = len(jobs)
    if on_found is not None:
        on_found(len(jobs))
    for job in jobs:
        run_id = imported_run_id(host, job.id)
        outcome = "skipped"
        if run_id in already_imported:
            report.skipped.append(job.id)
        else:
            try:
                imported = await asyncio.to_thread(import_job, backend, store, job, host)
                await publish(imported)
            except HostedTrainingError as exc:
                report.failed.append((job.id, exc.reason_code, exc.message))
                log.warning("import_job_failed", job_id=job.id, reason_code=exc.reason_code, error=exc.message)
                outcome = "failed"
            else:
                outcome = "imported"
                already_imported.add(run_id)
                archived = imported.archived
                report.imported.append(job.id)
                report.events_archived += archived.events_archived
                report.checkpoints += len(archived.checkpoints)
                report.files_kept += sum(1 for f in archived.files if f.artifact is not None)
                report.files_unavailable += [(job.id, f.file_id) for f in archived.files if f.artifact is None]
                if register is not None and archived.status == "succeeded" and archived.fine_tuned_model:
                    version = await register(imported)
                    if version is not None:
                        report.registered.append((job.id, version))
        if on_done is not None:
            on_done(job.id, outcome)
    return report


# --- a job followed by a Tuneline run ------------------------------------------------------------


def archive_followed_job(backend: Any, store: ArtifactStore, provider: str, job: Mapping[str, Any] | None,
                         outcome: Any, *, base_model: str, events_archived: int,
                         own_files: Mapping[str, Any]) -> ProviderJobArchived:
    """The archive of a job the trainer followed to its end (synchronous: provider I/O).

    `job`: its last snapshot (None from a backend that reports none); `own_files`: role -> the ArtifactRef the
    run uploaded (its training and validation splits need no download). Result files are downloaded when the
    job succeeded. Backends that cannot list checkpoints or serve files (test doubles) archive what `follow`
    reported."""
    if job is None:
        job = {"id": outcome.job_id, "status": outcome.status, "model": base_model,
               "fine_tuned_model": outcome.fine_tuned_model, "trained_tokens": outcome.trained_tokens,
               "result_files": list(outcome.result_files)}
    if hasattr(backend, "checkpoint_records"):
        checkpoints = checkpoints_from(backend.checkpoint_records(outcome.job_id)) if outcome.status == "succeeded" else []
    else:
        checkpoints = [ProviderCheckpoint(id=c.id, step=c.step, fine_tuned_model_checkpoint=c.model,
                                          metrics={k: v for k, v in (("train_loss", c.train_loss),
                                                                     ("valid_loss", c.valid_loss)) if v is not None})
                       for c in outcome.checkpoints]
    files = []
    for role, file_id in job_files(job):
        if role in own_files and own_files[role] is not None:
            files.append(ProviderFile(role=role, file_id=file_id, artifact=own_files[role]))
        elif role == "result" and outcome.status == "succeeded" and hasattr(backend, "file_info"):
            files.append(download(backend, store, role, file_id))
        else:
            files.append(ProviderFile(role=role, file_id=file_id))
    return archive_record(provider, {**job, "model": job.get("model") or base_model}, events_archived=events_archived,
                          checkpoints=checkpoints, files=files, imported=False)
