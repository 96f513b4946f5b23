"""Backend-neutral vocabulary for hosted fine-tuning (ARCHITECTURE D12).

A hosted backend trains on someone else's machines: it uploads the prepared splits, creates one
provider job per idempotency key (D3), follows the job's status and events until it ends, and can
cancel, pause and resume it (D5). Nothing here knows about the bus: the trainer service maps
`HostedProgress` to `training.progress`, `HostedOutcome` to `training.completed`/`training.failed`,
and `HostedTrainingError.reason_code` to the failure event's reason code.

Reason codes used here (D9): `training.runtime_error`, `training.timeout`, `training.cancelled`,
`training.capability_unsupported`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

RUNTIME_ERROR = "training.runtime_error"
TIMEOUT = "training.timeout"
CANCELLED = "training.cancelled"
CAPABILITY_UNSUPPORTED = "training.capability_unsupported"

REASON_CODES = frozenset({RUNTIME_ERROR, TIMEOUT, CANCELLED, CAPABILITY_UNSUPPORTED})

TerminalStatus = Literal["succeeded", "failed", "cancelled"]


class HostedTrainingError(Exception):
    """A hosted-training failure with a registered reason code.

    `retryable` says whether trying again later may help (a dropped connection or a rate limit that
    outlasted the SDK's retries), so a consumer can nack with backoff instead of failing the run (D4).
    Messages are built by the backends and never contain credentials.
    """

    def __init__(self, reason_code: str, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        if reason_code not in REASON_CODES:
            raise ValueError(f"unregistered hosted-training reason code: {reason_code!r}")
        super().__init__(reason_code, message)
        self.reason_code = reason_code
        self.message = message
        self.retryable = retryable
        self.status = status  # the provider's HTTP status, when it answered (404: the object is gone)

    def __str__(self) -> str:
        return f"{self.reason_code}: {self.message}"

    def __repr__(self) -> str:
        return f"HostedTrainingError({self.reason_code!r}, {self.message!r}, retryable={self.retryable})"


@dataclass(frozen=True)
class HostedJobSpec:
    """What to train. Hyperparameters left as None are chosen by the provider ("auto")."""

    base_model: str
    training_file: Path
    idempotency_key: str
    validation_file: Path | None = None
    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    suffix: str | None = None
    seed: int | None = None
    # Extra tags for the provider job (OpenAI job `metadata`: at most 16 pairs with the key's, keys up to 64
    # characters, string values up to 512), e.g. the run id and the trigger event id.
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ValueError("base_model is required")
        if not self.idempotency_key:
            raise ValueError("idempotency_key is required (derive it from the trigger event, D3)")
        if len(self.idempotency_key) > 512:
            raise ValueError("idempotency_key is longer than 512 characters (a metadata value's limit)")
        if len(self.labels) > 15:
            raise ValueError("at most 15 labels (job metadata holds 16 pairs, one is the idempotency key)")
        for k, v in self.labels.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k or len(k) > 64 or len(v) > 512:
                raise ValueError(f"label {k!r}: keys are 1-64 characters and values strings up to 512")
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "training_file", Path(self.training_file))
        if self.validation_file is not None:
            object.__setattr__(self, "validation_file", Path(self.validation_file))


@dataclass(frozen=True)
class HostedEvent:
    """One provider event, delivered once, in the order the provider created them."""

    id: str
    created_at: int
    level: str
    message: str
    type: str | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class HostedProgress:
    """A training-metrics report; fields the provider does not report are None."""

    step: int
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    learning_rate: float | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class HostedCheckpoint:
    id: str
    step: int
    model: str
    train_loss: float | None = None
    valid_loss: float | None = None


@dataclass(frozen=True)
class HostedOutcome:
    """How a job ended. `failed` and `cancelled` are outcomes too; `raise_for_status` turns them into errors."""

    job_id: str
    status: TerminalStatus
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    result_files: tuple[str, ...] = ()
    checkpoints: tuple[HostedCheckpoint, ...] = field(default=())

    @property
    def reason_code(self) -> str | None:
        return {"succeeded": None, "failed": RUNTIME_ERROR, "cancelled": CANCELLED}[self.status]

    def raise_for_status(self) -> HostedOutcome:
        if self.status == "failed":
            code = f" ({self.error_code})" if self.error_code else ""
            raise HostedTrainingError(
                RUNTIME_ERROR, f"hosted job {self.job_id} failed{code}: {self.error_message or 'no error message'}"
            )
        if self.status == "cancelled":
            raise HostedTrainingError(CANCELLED, f"hosted job {self.job_id} was cancelled")
        return self


OnProgress = Callable[[HostedProgress], None]
OnEvent = Callable[[HostedEvent], None]
OnPoll = Callable[[str], None]  # called once per poll with the job's current status (a heartbeat hook, D5)
OnJob = Callable[[Mapping[str, Any]], None]  # called once per poll with the job object as the provider sent it


@runtime_checkable
class HostedBackend(Protocol):
    """A hosted fine-tuning provider.

    submit: idempotent on `spec.idempotency_key`: returns the id of the job already created for that key
    (without uploading again) or uploads the files and creates the job.
    follow: polls until the job is terminal and returns its outcome; each provider event is passed to
    `on_event` exactly once and metrics events also to `on_progress` as HostedProgress; raises
    HostedTrainingError(`training.timeout`) when `timeout` seconds pass first (the job keeps running);
    `since_event_id` resumes delivery after an event an earlier follow delivered (D5: follow again after a crash);
    `on_job` gets the provider's job object (JSON, credentials scrubbed) at every poll, for the archive.
    cancel/pause/resume: return the job's status after the request.
    """

    def submit(self, spec: HostedJobSpec) -> str: ...

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
    ) -> HostedOutcome: ...

    def cancel(self, job_id: str) -> str: ...

    def pause(self, job_id: str) -> str: ...

    def resume(self, job_id: str) -> str: ...
