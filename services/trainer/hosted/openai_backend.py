"""Hosted fine-tuning on the OpenAI API, or any OpenAI-compatible host (a `base_url`), via the official SDK.

Endpoints used (OpenAI API reference, fine-tuning and files): POST /files (purpose "fine-tune"),
GET /files?purpose=fine-tune, POST /fine_tuning/jobs, GET /fine_tuning/jobs?metadata[k]=v,
GET /fine_tuning/jobs/{id}, GET /fine_tuning/jobs/{id}/events (newest first; `after` pages to older),
GET /fine_tuning/jobs/{id}/checkpoints, POST /fine_tuning/jobs/{id}/cancel|pause|resume; for the archive
(services.trainer.hosted.archive) also GET /files/{id} and GET /files/{id}/content. Every list is newest first
and paged with `after` = the last id of the previous page (a cursor, `has_more` says whether to go on).

Retries: the SDK retries 408/409/429/5xx and dropped connections with backoff (honouring `retry-after`);
what still fails surfaces as HostedTrainingError("training.runtime_error", retryable=...).

Secrets: the API key is read from a named environment variable and handed to the SDK only. It is
scrubbed from every message this module builds, provider messages on 401/403 are not repeated at all,
and errors are raised outside the SDK's exception context, so no SDK exception (whose request carries
the Authorization header) hangs off ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import openai
from openai import OpenAI

from services.common.logging import get_logger
from services.trainer.hosted.base import (
    CAPABILITY_UNSUPPORTED,
    RUNTIME_ERROR,
    TIMEOUT,
    HostedCheckpoint,
    HostedEvent,
    HostedJobSpec,
    HostedOutcome,
    HostedProgress,
    HostedTrainingError,
    OnEvent,
    OnJob,
    OnPoll,
    OnProgress,
)

log = get_logger(__name__)

METADATA_KEY = "tuneline_idempotency_key"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
SUFFIX_MAX = 64  # documented limit on `suffix`
_RETRYABLE_STATUS = frozenset({408, 409, 429})


class _BodyBrokeOff(Exception):
    """A streamed response body ended early (its message is already scrubbed)."""


def suffix_for(spec: HostedJobSpec) -> str:
    """The job suffix: the requested one (if any) plus a tag derived from the idempotency key.

    The tag lets a job be found again from its fine-tuned model name on hosts without job metadata.
    """
    tag = "tl-" + hashlib.sha256(spec.idempotency_key.encode()).hexdigest()[:12]
    if not spec.suffix:
        return tag
    return f"{spec.suffix[: SUFFIX_MAX - len(tag) - 1]}-{tag}"


def _sha256_and_size(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    n = _number(value)
    return None if n is None else int(n)


def progress_from_metrics(data: Mapping[str, Any] | None, n_epochs: int | None = None) -> HostedProgress | None:
    """A `metrics` event's data -> HostedProgress (None without a step).

    The API reference leaves `data` untyped; OpenAI reports `step`, `total_steps`, `train_loss`,
    `train_mean_token_accuracy`, `valid_loss`, `full_valid_loss` (the keys of the documented checkpoint
    `metrics` object). Epoch is derived from step/total_steps and the job's n_epochs when not reported.
    """
    if not isinstance(data, Mapping):
        return None
    step = _int(data.get("step"))
    if step is None:
        return None
    total = _int(data.get("total_steps"))
    epoch = _number(data.get("epoch"))
    if epoch is None and total and n_epochs:
        epoch = step / total * n_epochs
    valid = _number(data.get("valid_loss"))
    if valid is None:
        valid = _number(data.get("full_valid_loss"))
    return HostedProgress(
        step=step,
        total_steps=total,
        epoch=epoch,
        train_loss=_number(data.get("train_loss")),
        valid_loss=valid,
        learning_rate=_number(data.get("learning_rate")),
        tokens=_int(data.get("tokens", data.get("trained_tokens"))),
    )


def _n_epochs(job: Any) -> int | None:
    method = getattr(job, "method", None)
    supervised = getattr(method, "supervised", None) if method is not None else None
    for hp in (getattr(getattr(supervised, "hyperparameters", None), "n_epochs", None),
               getattr(getattr(job, "hyperparameters", None), "n_epochs", None)):
        if isinstance(hp, int) and not isinstance(hp, bool):
            return hp
    return None


def _chronological(events: list[Any]) -> list[Any]:
    """The API lists events newest first; tolerate a host that lists them oldest first."""
    ts = [e.created_at for e in events]
    ascending = all(a <= b for a, b in zip(ts, ts[1:])) and any(a < b for a, b in zip(ts, ts[1:]))
    return events if ascending else list(reversed(events))


class OpenAIHostedBackend:
    """HostedBackend on the `openai` SDK. Synchronous: call it from a worker thread in async code."""

    def __init__(
        self,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        base_url: str | None = None,
        provider: str = "openai",
        http_client: Any = None,
        max_retries: int = 2,
        request_timeout: float = 60.0,
        use_metadata: bool = True,
        event_page_size: int = 100,
        max_event_pages: int = 50,
        max_list_scan: int = 500,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        resume_attempts: int = 5,
        list_page_size: int = 100,
    ) -> None:
        key = os.environ.get(api_key_env)
        if not key:
            raise HostedTrainingError(
                RUNTIME_ERROR, f"no API key for {provider}: environment variable {api_key_env} is not set or empty"
            )
        self._key_env = api_key_env
        self._provider = provider
        self._scrub_values = (key,)
        self._max_retries = max_retries
        self._use_metadata = use_metadata
        self._event_page_size = event_page_size
        self._max_event_pages = max_event_pages
        self._max_list_scan = max_list_scan
        self._sleep = sleep
        self._clock = clock
        self._resume_attempts = resume_attempts
        self._list_page_size = list_page_size
        self.provider = provider
        kwargs: dict[str, Any] = {"api_key": key, "max_retries": max_retries, "timeout": request_timeout}
        if base_url is not None:
            kwargs["base_url"] = base_url
        if http_client is not None:
            kwargs["http_client"] = http_client
        self._client = OpenAI(**kwargs)
        self._base_url = str(self._client.base_url)

    @property
    def base_url(self) -> str:
        return self._base_url

    def __repr__(self) -> str:
        return (f"OpenAIHostedBackend(provider={self._provider!r}, base_url={self._base_url!r}, "
                f"api_key_env={self._key_env!r})")

    # --- errors -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._scrub_values:
            if secret:
                text = text.replace(secret, "***")
        return text

    def _status_error(self, what: str, exc: openai.APIStatusError) -> HostedTrainingError:
        status = exc.status_code
        code = getattr(exc, "code", None)
        code_part = f" {code}" if code else ""
        if status in (401, 403):
            # Provider messages about keys may quote (part of) the key: say which variable, not what it holds.
            return HostedTrainingError(
                RUNTIME_ERROR,
                f"{self._provider} refused the credentials from ${self._key_env} while trying to {what} "
                f"(HTTP {status}{code_part})", status=status,
            )
        retryable = status in _RETRYABLE_STATUS or status >= 500
        tail = f" after {self._max_retries} retries" if retryable else ""
        message = self._scrub(str(getattr(exc, "message", "") or ""))
        return HostedTrainingError(
            RUNTIME_ERROR,
            f"{self._provider} answered HTTP {status}{code_part} while trying to {what}{tail}: {message}",
            retryable=retryable, status=status,
        )

    def _connection_error(self, what: str, exc: openai.APIConnectionError) -> HostedTrainingError:
        cause = exc.__cause__
        detail = f"{type(cause).__name__}: {self._scrub(str(cause))}" if cause is not None else type(exc).__name__
        kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "connection failed"
        return HostedTrainingError(
            RUNTIME_ERROR,
            f"could not {what}: {kind} to {self._provider} at {self._base_url} "
            f"after {self._max_retries} retries ({detail})",
            retryable=True,
        )

    def _call(self, what: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        failure: HostedTrainingError
        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as exc:
            failure = self._status_error(what, exc)
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            failure = self._connection_error(what, exc)
        except _BodyBrokeOff as exc:
            failure = HostedTrainingError(
                RUNTIME_ERROR, f"could not {what}: the connection to {self._provider} broke off mid-body ({exc})",
                retryable=True)
        except openai.OpenAIError as exc:
            failure = HostedTrainingError(
                RUNTIME_ERROR, f"{self._provider} client error while trying to {what}: "
                f"{type(exc).__name__}: {self._scrub(str(exc))}"
            )
        # Raised here, outside the except block, so the SDK exception is neither cause nor context.
        log.warning("hosted.request_failed", provider=self._provider, what=what,
                    reason_code=failure.reason_code, retryable=failure.retryable, error=failure.message)
        raise failure

    # --- submit -------------------------------------------------------------------------------

    def submit(self, spec: HostedJobSpec) -> str:
        suffix = suffix_for(spec)
        existing = self.find_job(spec.idempotency_key, suffix)
        if existing is not None:
            log.info("hosted.job_reused", provider=self._provider, job_id=existing.id, status=existing.status)
            return existing.id
        training_file = self._upload(spec.training_file)
        validation_file = self._upload(spec.validation_file) if spec.validation_file is not None else None
        hyper = {k: v for k, v in (("n_epochs", spec.n_epochs), ("batch_size", spec.batch_size),
                                   ("learning_rate_multiplier", spec.learning_rate_multiplier)) if v is not None}
        body: dict[str, Any] = {
            "model": spec.base_model,
            "training_file": training_file,
            "suffix": suffix,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        }
        if validation_file is not None:
            body["validation_file"] = validation_file
        if spec.seed is not None:
            body["seed"] = spec.seed
        if self._use_metadata:
            # Documented: job `metadata` (string pairs) is returned by GET /fine_tuning/jobs and filterable
            # there (metadata[k]=v): find_job finds this job again by its key.
            body["metadata"] = {**{k: v for k, v in spec.labels.items() if k != METADATA_KEY},
                                METADATA_KEY: spec.idempotency_key}
        return self._create(body, spec.idempotency_key, suffix)

    def _create(self, body: dict[str, Any], key: str, suffix: str) -> str:
        """POST /fine_tuning/jobs at most once per key.

        The SDK would resend a POST whose response was lost (a dropped connection, a 5xx), which can
        create a second job. So creation runs without SDK retries, and before each retry of our own the
        job is looked up by its key: if the lost request did create it, that job is returned.
        """
        client = self._client.with_options(max_retries=0)
        for attempt in range(self._max_retries + 1):
            try:
                job = self._call("create the fine-tuning job", client.fine_tuning.jobs.create, **body)
            except HostedTrainingError as exc:
                if not exc.retryable or attempt == self._max_retries:
                    raise
                self._sleep(min(0.5 * 2**attempt, 8.0))
                existing = self.find_job(key, suffix)
                if existing is not None:
                    log.info("hosted.job_reused", provider=self._provider, job_id=existing.id, after="lost create")
                    return existing.id
                continue
            log.info("hosted.job_created", provider=self._provider, job_id=job.id, model=body["model"], suffix=suffix)
            return job.id
        raise AssertionError("unreachable")

    def _matches(self, job: Any, key: str, suffix: str) -> bool:
        metadata = getattr(job, "metadata", None) or {}
        if isinstance(metadata, Mapping) and metadata.get(METADATA_KEY) == key:
            return True
        if getattr(job, "suffix", None) == suffix:  # hosts that echo the suffix (an extra field to the SDK)
            return True
        model = getattr(job, "fine_tuned_model", None) or ""
        return suffix in model

    def find_job(self, key: str, suffix: str) -> Any | None:
        """The newest job carrying this idempotency key (metadata) or suffix tag, or None.

        Asks with the documented `metadata[k]=v` filter and checks each job itself, so a host that ignores
        the filter is scanned instead (up to max_list_scan jobs).
        """
        query: dict[str, Any] = {"limit": 100}
        if self._use_metadata:
            query["metadata"] = {METADATA_KEY: key}
        for job in self._paged("look up existing fine-tuning jobs", self._client.fine_tuning.jobs.list, query):
            if self._matches(job, key, suffix):
                return job
        return None

    def _paged(self, what: str, fn: Callable[..., Any], query: dict[str, Any]) -> Iterable[Any]:
        seen = 0
        after: str | None = None
        while seen < self._max_list_scan:
            page = self._call(what, fn, **query, **({"after": after} if after else {}))
            for item in page.data:
                seen += 1
                yield item
            if not page.data or page.has_more is False:
                return
            after = page.data[-1].id

    def _upload(self, path: Path) -> str:
        """Upload a split once: files are named by content hash and an existing upload is reused."""
        if not path.is_file():
            raise HostedTrainingError(RUNTIME_ERROR, f"training split not found: {path}")
        digest, size = _sha256_and_size(path)
        name = f"tuneline-{digest[:16]}-{path.name}"
        for f in self._list_files():
            if f.filename == name and f.bytes == size and getattr(f, "status", None) != "error":
                log.info("hosted.file_reused", provider=self._provider, file_id=f.id, filename=name)
                return f.id
        with path.open("rb") as fh:
            uploaded = self._call(f"upload {path.name}", self._client.files.create,
                                  file=(name, fh, "application/jsonl"), purpose="fine-tune")
        log.info("hosted.file_uploaded", provider=self._provider, file_id=uploaded.id, filename=name, bytes=size)
        return uploaded.id

    def _list_files(self) -> Iterable[Any]:
        try:
            yield from self._paged("list uploaded files", self._client.files.list,
                                   {"purpose": "fine-tune", "limit": 100})
        except HostedTrainingError as exc:
            if exc.retryable:
                raise
            # A host without GET /files (or without its purpose filter) just uploads again.
            log.info("hosted.file_list_unavailable", provider=self._provider, error=exc.message)

    # --- follow -------------------------------------------------------------------------------

    def follow(
        self,
        job_id: str,
        on_progress: OnProgress | None = None,
        on_event: OnEvent | None = None,
        poll_interval: float = 10.0,
        timeout: float | None = None,
        *,
        on_poll: OnPoll | None = None,
        since_event_id: str | None = None,
        on_job: OnJob | None = None,
    ) -> HostedOutcome:
        """See HostedBackend.follow. `since_event_id`: the last event already delivered (by an earlier
        follow, before a crash); it and the events the provider lists after it (older) are not delivered again."""
        deadline = None if timeout is None else self._clock() + timeout
        seen: set[str] = set()
        cursor = since_event_id
        n_epochs: int | None = None
        while True:
            # Job first, then events: when the job is terminal, its last events are already listed.
            job = self._call(f"retrieve job {job_id}", self._client.fine_tuning.jobs.retrieve, job_id)
            n_epochs = n_epochs or _n_epochs(job)
            if on_job is not None:
                on_job(self.job_json(job))
            events = self._new_events(job_id, seen, cursor)
            cursor = None
            for event in events:
                if on_event is not None:
                    on_event(event)
                if event.type == "metrics" and on_progress is not None:
                    progress = progress_from_metrics(event.data, n_epochs)
                    if progress is not None:
                        on_progress(progress)
            if on_poll is not None:
                on_poll(job.status)
            if job.status in TERMINAL:
                outcome = self._outcome(job)
                log.info("hosted.job_finished", provider=self._provider, job_id=job_id, status=outcome.status,
                         fine_tuned_model=outcome.fine_tuned_model, error_code=outcome.error_code)
                return outcome
            if deadline is not None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise HostedTrainingError(
                        TIMEOUT, f"{self._provider} job {job_id} still {job.status} after {timeout:g}s; "
                        "it was not cancelled"
                    )
                self._sleep(max(0.0, min(poll_interval, remaining)))
            else:
                self._sleep(poll_interval)

    def _new_events(self, job_id: str, seen: set[str], cursor: str | None = None) -> list[HostedEvent]:
        """Events not delivered yet, oldest first. Pages back (newest first) until a delivered one appears."""
        fresh: list[Any] = []
        fresh_ids: set[str] = set()
        after: str | None = None
        for _ in range(self._max_event_pages):
            query: dict[str, Any] = {"limit": self._event_page_size}
            if after:
                query["after"] = after
            page = self._call(f"list events of job {job_id}", self._client.fine_tuning.jobs.list_events,
                              job_id, **query)
            reached_seen = False
            for ev in page.data:
                if ev.id == cursor or (cursor is not None and reached_seen):
                    seen.add(ev.id)  # the cursor and what is listed after it (older) were delivered before
                    reached_seen = True
                elif ev.id in seen:
                    reached_seen = True
                elif ev.id not in fresh_ids:
                    fresh_ids.add(ev.id)
                    fresh.append(ev)
            if reached_seen or not page.data or page.has_more is False:
                break
            after = page.data[-1].id
        out = []
        for ev in _chronological(fresh):
            seen.add(ev.id)
            data = ev.data if isinstance(ev.data, Mapping) else None
            out.append(HostedEvent(id=ev.id, created_at=ev.created_at, level=ev.level,
                                   message=self._scrub(ev.message or ""), type=ev.type, data=data))
        return out

    def _outcome(self, job: Any) -> HostedOutcome:
        error = getattr(job, "error", None)
        error_code = getattr(error, "code", None) or None
        error_message = self._scrub(getattr(error, "message", None) or "") or None
        checkpoints = self.checkpoints(job.id) if job.status == "succeeded" else ()
        return HostedOutcome(
            job_id=job.id,
            status=job.status,
            fine_tuned_model=job.fine_tuned_model,
            trained_tokens=job.trained_tokens,
            error_code=error_code,
            error_message=error_message,
            result_files=tuple(job.result_files or ()),
            checkpoints=checkpoints,
        )

    def _checkpoint_items(self, job_id: str) -> list[Any]:
        """The job's checkpoint objects as the provider lists them (empty where the host has no
        checkpoints endpoint)."""
        try:
            return list(self._walk(f"list checkpoints of job {job_id}",
                                   lambda **q: self._client.fine_tuning.jobs.checkpoints.list(job_id, **q),
                                   {"limit": 100}))
        except HostedTrainingError as exc:
            if exc.retryable:
                raise
            log.info("hosted.checkpoints_unavailable", provider=self._provider, job_id=job_id, error=exc.message)
            return []

    def checkpoints(self, job_id: str) -> tuple[HostedCheckpoint, ...]:
        """The job's checkpoints, oldest step first (empty where the host has no checkpoints endpoint)."""
        out = []
        items = self._checkpoint_items(job_id)
        for c in items:
            metrics = getattr(c, "metrics", None)
            valid = getattr(metrics, "valid_loss", None)
            if valid is None:
                valid = getattr(metrics, "full_valid_loss", None)
            out.append(HostedCheckpoint(id=c.id, step=c.step_number, model=c.fine_tuned_model_checkpoint,
                                        train_loss=getattr(metrics, "train_loss", None), valid_loss=valid))
        return tuple(sorted(out, key=lambda c: c.step))

    # --- archive ------------------------------------------------------------------------------

    def job_json(self, obj: Any) -> dict[str, Any]:
        """A provider object as the JSON the provider sent, with the API key scrubbed from every string."""
        text = json.dumps(obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj, sort_keys=True)
        return json.loads(self._scrub(text))

    def _walk(self, what: str, fn: Callable[..., Any], query: dict[str, Any]) -> Iterator[Any]:
        """Every item of a cursor-paged list, once each, in the provider's order.

        The SDK retries a dropped connection or a 429 (honouring retry-after) itself; when its retries run
        out, the listing resumes from the cursor it had reached (the same `after`), up to resume_attempts
        times in a row with backoff, so no page is read twice and no item is yielded twice."""
        after: str | None = None
        seen: set[str] = set()
        failures = 0
        while True:
            try:
                page = self._call(what, fn, **query, **({"after": after} if after else {}))
            except HostedTrainingError as exc:
                if not exc.retryable or failures >= self._resume_attempts:
                    raise
                failures += 1
                log.info("hosted.listing_resumed", provider=self._provider, what=what, after=after, attempt=failures)
                self._sleep(min(2.0 ** (failures - 1), 30.0))
                continue
            failures = 0
            for item in page.data:
                if item.id not in seen:
                    seen.add(item.id)
                    yield item
            if not page.data or page.has_more is False:
                return
            after = page.data[-1].id

    def list_jobs(self, since: int | None = None) -> Iterator[Any]:
        """The organisation's fine-tuning jobs, newest first; with `since` (unix seconds) only jobs created
        at or after it (the listing stops at the first older one: the list is newest first)."""
        for job in self._walk("list fine-tuning jobs", self._client.fine_tuning.jobs.list,
                              {"limit": self._list_page_size}):
            if since is not None and (job.created_at or 0) < since:
                return
            yield job

    def job_events(self, job_id: str) -> list[HostedEvent]:
        """All of a job's events, oldest first."""
        items = list(self._walk(f"list events of job {job_id}",
                                lambda **q: self._client.fine_tuning.jobs.list_events(job_id, **q),
                                {"limit": self._list_page_size}))
        return [HostedEvent(id=ev.id, created_at=ev.created_at, level=ev.level, message=self._scrub(ev.message or ""),
                            type=ev.type, data=ev.data if isinstance(ev.data, Mapping) else None)
                for ev in _chronological(items)]

    def checkpoint_records(self, job_id: str) -> list[dict[str, Any]]:
        """The job's checkpoints as the provider lists them (every metric), oldest step first; empty where the
        host has no checkpoints endpoint."""
        items = self._checkpoint_items(job_id)
        return sorted((self.job_json(c) for c in items), key=lambda c: c.get("step_number") or 0)

    def file_info(self, file_id: str) -> dict[str, Any]:
        """GET /files/{id}: the file object (HostedTrainingError with status 404 when it is gone)."""
        return self.job_json(self._call(f"retrieve file {file_id}", self._client.files.retrieve, file_id))

    def download_file(self, file_id: str, write: Callable[[bytes], None]) -> int:
        """Stream GET /files/{id}/content into `write`; returns the byte count."""
        return self._call(f"download file {file_id}", self._download, file_id, write)

    def _download(self, file_id: str, write: Callable[[bytes], None]) -> int:
        size = 0
        with self._client.files.with_streaming_response.content(file_id) as response:
            try:
                for chunk in response.iter_bytes(1 << 20):
                    write(chunk)
                    size += len(chunk)
            except Exception as exc:  # noqa: BLE001 - the body broke off (a transport error of the SDK's http client)
                detail = f"{type(exc).__name__}: {self._scrub(str(exc))}"
                raise _BodyBrokeOff(detail) from None
        return size

    # --- control ------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> str:
        return self._control("cancel", job_id)

    def pause(self, job_id: str) -> str:
        return self._control("pause", job_id)

    def resume(self, job_id: str) -> str:
        return self._control("resume", job_id)

    def _control(self, action: str, job_id: str) -> str:
        fn = getattr(self._client.fine_tuning.jobs, action, None)
        if fn is None:
            raise HostedTrainingError(
                CAPABILITY_UNSUPPORTED,
                f"the installed openai SDK ({openai.__version__}) has no fine_tuning.jobs.{action}",
            )
        job = self._call(f"{action} job {job_id}", fn, job_id)
        log.info(f"hosted.job_{action}", provider=self._provider, job_id=job_id, status=job.status)
        return job.status

    def close(self) -> None:
        self._client.close()
