"""Registered event types, one section per stage."""

from __future__ import annotations

from pydantic import Field

from contracts.common import ArtifactRef, Frozen, RunPlan
from contracts.registry import register


class StageFailure(Frozen):
    """Common shape of every `<stage>.failed` event; the envelope carries the reason code."""

    stage: str
    message: str
    trigger_type: str | None = None
    plan: RunPlan | None = None


# --- ingest ---------------------------------------------------------------------------------


@register("ingest.committed", kind="event")
class IngestCommitted(Frozen):
    plan: RunPlan
    dataset: ArtifactRef
    rejected: ArtifactRef
    rows_read: int = Field(ge=0)
    rows_accepted: int = Field(ge=0)
    rows_rejected: int = Field(ge=0)
    rejected_by_reason: dict[str, int]


@register("ingest.failed", kind="event")
class IngestFailed(StageFailure):
    pass


# --- prep -----------------------------------------------------------------------------------


@register("prep.prepared", kind="event")
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


@register("prep.failed", kind="event")
class PrepFailed(StageFailure):
    pass


# --- trainer --------------------------------------------------------------------------------


@register("training.started", kind="event")
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


@register("training.completed", kind="event")
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


@register("training.failed", kind="event")
class TrainingFailed(StageFailure):
    pass


# --- evaluator ------------------------------------------------------------------------------


class ClassificationMetrics(Frozen):
    accuracy: float
    macro_f1: float
    n: int


@register("eval.completed", kind="event")
class EvalCompleted(Frozen):
    plan: RunPlan
    base_model: str
    adapter: ArtifactRef
    eval: ArtifactRef
    candidate: ClassificationMetrics
    base: ClassificationMetrics
    label_space: list[str]


@register("eval.failed", kind="event")
class EvalFailed(StageFailure):
    pass


# --- export ---------------------------------------------------------------------------------


@register("export.completed", kind="event")
class ExportCompleted(Frozen):
    plan: RunPlan
    base_model: str
    export: ArtifactRef  # directory manifest of the exported files
    format: str
    files: dict[str, str]  # path -> sha256
    candidate: ClassificationMetrics
    base: ClassificationMetrics


@register("export.failed", kind="event")
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


@register("registry.failed", kind="event")
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
