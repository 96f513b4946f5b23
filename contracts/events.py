"""Registered event types, one section per stage."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from contracts.common import PLAN_V2, ArtifactRef, FieldMapping, Frozen, RunPlan, TaskShape
from contracts.reason_codes import is_registered
from contracts.registry import register


class Notice(Frozen):
    """A warning inside a payload (e.g. too few rows for a class): a registered code and a message."""

    reason_code: str
    message: str

    @field_validator("reason_code")
    @classmethod
    def _registered(cls, value: str) -> str:
        if not is_registered(value):
            raise ValueError(f"reason code {value!r} is not registered in contracts.reason_codes")
        return value


class StageFailure(Frozen):
    """Common shape of every `<stage>.failed` event; the envelope carries the reason code."""

    stage: str
    message: str
    trigger_type: str | None = None
    plan: RunPlan | None = None


# --- ingest ---------------------------------------------------------------------------------


class ShapeHypothesis(Frozen):
    shape: TaskShape
    confidence: float = Field(ge=0, le=1)
    mapping: FieldMapping
    rationale: str


@register("ingest.introspected", kind="event")
class IngestIntrospected(Frozen):
    """Shape hypotheses for a source, best first, from a sample of its rows."""

    locator: str
    source: dict[str, Any]
    sample_rows: int = Field(ge=0)
    fields: list[str]
    hypotheses: list[ShapeHypothesis]
    auto_pick: bool  # the best hypothesis is at least 0.80 confident


@register("ingest.dry_run_completed", kind="event")
class IngestDryRunCompleted(Frozen):
    """What a commit would do: counts, a sample of accepted rows, every rejected row (artifact)."""

    locator: str
    mapping: FieldMapping
    rows_read: int = Field(ge=0)
    rows_accepted: int = Field(ge=0)
    rows_rejected: int = Field(ge=0)
    rejected_by_reason: dict[str, int]
    sample_accepted: list[dict[str, Any]]
    rejected: ArtifactRef


class CommittedRows(Frozen):
    """One committed source: accepted rows, every rejected row, and the counts (read = accepted + rejected)."""

    locator: str
    dataset: ArtifactRef
    rejected: ArtifactRef
    rows_read: int = Field(ge=0)
    rows_accepted: int = Field(ge=0)
    rows_rejected: int = Field(ge=0)
    rejected_by_reason: dict[str, int]


@register("ingest.committed", kind="event", version=2, upcasters=PLAN_V2)
class IngestCommitted(Frozen):
    plan: RunPlan
    dataset: ArtifactRef
    rejected: ArtifactRef
    rows_read: int = Field(ge=0)
    rows_accepted: int = Field(ge=0)
    rows_rejected: int = Field(ge=0)
    rejected_by_reason: dict[str, int]
    mapping: FieldMapping | None = None       # the mapping applied (v2)
    mapping_confidence: float | None = None   # when introspection chose it (v2)
    source: dict[str, Any] = Field(default_factory=dict)  # the source's description, no secrets (v2)
    eval_source: CommittedRows | None = None  # the plan's explicit eval dataset, same mapping (v2)


@register("ingest.failed", kind="event", version=2, upcasters=PLAN_V2)
class IngestFailed(StageFailure):
    pass


# --- prep -----------------------------------------------------------------------------------


@register("prep.cleaned", kind="event")
class PrepCleaned(Frozen):
    """Cleaning's account: rows_in = rows_kept + sum(dropped_by_reason), every dropped row in `dropped`."""

    plan: RunPlan
    rows_in: int = Field(ge=0)
    rows_kept: int = Field(ge=0)
    dropped_by_reason: dict[str, int]
    dropped: ArtifactRef
    pii_by_kind: dict[str, int]
    rows_with_pii: int = Field(ge=0)
    stats: dict[str, Any] = Field(default_factory=dict)


class CostEstimate(Frozen):
    model: str
    training_tokens: int = Field(ge=0)
    epochs: int = Field(ge=1)
    usd_per_1m_tokens: float = Field(ge=0)
    usd: float = Field(ge=0)               # tokens x epochs x price, plus the buffer
    buffer: float = 0.2
    prices_as_of: str


@register("prep.prepared", kind="event", version=2, upcasters=PLAN_V2)
class PrepPrepared(Frozen):
    plan: RunPlan
    manifest: ArtifactRef
    train: ArtifactRef
    eval: ArtifactRef
    label_space: list[str]
    train_rows: int = Field(ge=0)
    eval_rows: int = Field(ge=0)
    duplicates_dropped: int = Field(0, ge=0)  # exact duplicates and texts seen under two labels
    dataset_version: str
    openai_train: ArtifactRef | None = None   # OpenAI chat fine-tuning JSONL (v2)
    openai_eval: ArtifactRef | None = None    # (v2)
    token_estimate: int | None = None         # (v2)
    cost_estimate: CostEstimate | None = None  # (v2)
    warnings: list[Notice] = Field(default_factory=list)  # (v2)


@register("prep.failed", kind="event", version=2, upcasters=PLAN_V2)
class PrepFailed(StageFailure):
    pass


# --- trainer --------------------------------------------------------------------------------


@register("training.started", kind="event", version=2, upcasters=PLAN_V2)
class TrainingStarted(Frozen):
    plan: RunPlan
    base_model: str
    max_steps: int
    train_rows: int


@register("training.progress", kind="event")
class TrainingProgressed(Frozen):
    step: int
    max_steps: int
    epoch: float
    loss: float
    learning_rate: float
    examples_per_s: float
    eta_s: float


@register("training.completed", kind="event", version=2, upcasters=PLAN_V2)
class TrainingCompleted(Frozen):
    plan: RunPlan
    base_model: str
    adapter: ArtifactRef  # a directory manifest: see services.common.artifacts
    manifest: ArtifactRef
    eval: ArtifactRef
    label_space: list[str]
    steps: int
    final_loss: float
    examples_per_s: float
    wall_s: float


@register("training.failed", kind="event", version=2, upcasters=PLAN_V2)
class TrainingFailed(StageFailure):
    pass


# --- evaluator ------------------------------------------------------------------------------


class ClassificationMetrics(Frozen):
    accuracy: float
    macro_f1: float
    n: int


@register("eval.completed", kind="event", version=2, upcasters=PLAN_V2)
class EvalCompleted(Frozen):
    plan: RunPlan
    base_model: str
    adapter: ArtifactRef
    eval: ArtifactRef
    candidate: ClassificationMetrics
    base: ClassificationMetrics
    label_space: list[str]


@register("eval.failed", kind="event", version=2, upcasters=PLAN_V2)
class EvalFailed(StageFailure):
    pass


# --- export ---------------------------------------------------------------------------------


@register("export.completed", kind="event", version=2, upcasters=PLAN_V2)
class ExportCompleted(Frozen):
    plan: RunPlan
    base_model: str
    export: ArtifactRef  # directory manifest of the exported files
    format: str
    files: dict[str, str]  # path -> sha256
    candidate: ClassificationMetrics
    base: ClassificationMetrics


@register("export.failed", kind="event", version=2, upcasters=PLAN_V2)
class ExportFailed(StageFailure):
    pass


# --- registry -------------------------------------------------------------------------------


@register("registry.version_registered", kind="event")
class VersionRegistered(Frozen):
    target: str
    version: int = Field(ge=1)
    status: str = "candidate"
    export: ArtifactRef
    base_model: str
    candidate: ClassificationMetrics
    base: ClassificationMetrics
    source_run_id: str


@register("registry.failed", kind="event", version=2, upcasters=PLAN_V2)
class RegistryFailed(StageFailure):
    pass


# --- bus ------------------------------------------------------------------------------------


@register("bus.message_dead_lettered", kind="event")
class MessageDeadLettered(Frozen):
    """A consumer could not handle a message and moved it to the DLQ; the envelope carries why."""

    consumer: str
    subject: str
    stream_sequence: int
    deliveries: int
    error: str
    dlq_subject: str
