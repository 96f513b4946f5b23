"""Registered event types, one section per stage."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from contracts.common import PLAN_V3, ArtifactRef, FieldMapping, Frozen, RunPlan, TaskShape, upcast_plan_v2
from contracts.reason_codes import is_registered
from contracts.registry import register


def _registered_reasons(counts: dict[str, int]) -> dict[str, int]:
    unknown = sorted(k for k in counts if not is_registered(k))
    if unknown:
        raise ValueError(f"counts by reason name unregistered reason codes: {', '.join(unknown[:5])}")
    return counts


# Row counts by reason code: the codes must be registered (D9), as the timeline and the History view
# read them as such.
ReasonCounts = Annotated[dict[str, int], AfterValidator(_registered_reasons)]


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
    rejected_by_reason: ReasonCounts
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
    rejected_by_reason: ReasonCounts


@register("ingest.committed", kind="event", version=3, upcasters=PLAN_V3)
class IngestCommitted(Frozen):
    plan: RunPlan
    dataset: ArtifactRef
    rejected: ArtifactRef
    rows_read: int = Field(ge=0)
    rows_accepted: int = Field(ge=0)
    rows_rejected: int = Field(ge=0)
    rejected_by_reason: ReasonCounts
    mapping: FieldMapping | None = None       # the mapping applied (v2)
    mapping_confidence: float | None = None   # when introspection chose it (v2)
    source: dict[str, Any] = Field(default_factory=dict)  # the source's description, no secrets (v2)
    eval_source: CommittedRows | None = None  # the plan's explicit eval dataset, same mapping (v2)


@register("ingest.failed", kind="event", version=3, upcasters=PLAN_V3)
class IngestFailed(StageFailure):
    pass


# --- prep -----------------------------------------------------------------------------------


@register("prep.cleaned", kind="event", version=2, upcasters={1: upcast_plan_v2})
class PrepCleaned(Frozen):
    """Cleaning's account: rows_in = rows_kept + sum(dropped_by_reason), every dropped row in `dropped`."""

    plan: RunPlan
    rows_in: int = Field(ge=0)
    rows_kept: int = Field(ge=0)
    dropped_by_reason: ReasonCounts
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


@register("prep.prepared", kind="event", version=3, upcasters=PLAN_V3)
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


@register("prep.failed", kind="event", version=3, upcasters=PLAN_V3)
class PrepFailed(StageFailure):
    pass


# --- trainer --------------------------------------------------------------------------------


class PreflightCheck(Frozen):
    """One preflight finding: `ok`, `warn` (reported, never blocks) or `block` (blocks in strict mode)."""

    name: str                      # dependencies, memory, capability, data, device, ...
    status: Literal["ok", "warn", "block"]
    message: str
    reason_code: str | None = None

    @field_validator("reason_code")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None and not is_registered(value):
            raise ValueError(f"reason code {value!r} is not registered in contracts.reason_codes")
        return value


class MemoryEstimate(Frozen):
    """Bytes needed to train (weights + gradients + optimizer state + activations) against what the
    device has available; `fits` is the preflight's verdict with its safety margin."""

    device: str
    weights: int = Field(ge=0)
    gradients: int = Field(ge=0)
    optimizer: int = Field(ge=0)
    activations: int = Field(ge=0)
    total: int = Field(ge=0)
    available: int | None = None
    fits: bool | None = None
    total_params: int = Field(0, ge=0)
    trainable_params: int = Field(0, ge=0)


class TrainPlan(Frozen):
    """What the trainer will do, generated by preflight from the recipe, the data and the device."""

    recipe: str
    task: str
    backend: str
    method: str
    base_model: str
    device: str
    train_rows: int = Field(ge=0)
    eval_rows: int = Field(ge=0)
    steps: int = Field(ge=0)
    epochs: float = Field(ge=0)
    eval_every_steps: int = Field(ge=0)
    checkpoint_every_steps: int = Field(ge=0)
    patience: int | None = None
    settings: dict[str, Any]       # the resolved recipe, field by field
    cost_estimate: CostEstimate | None = None  # hosted backends: recorded before the job starts


@register("preflight.passed", kind="event", version=1)
class PreflightPassed(Frozen):
    plan: RunPlan
    train_plan: TrainPlan
    checks: list[PreflightCheck]
    memory: MemoryEstimate | None = None
    warnings: list[Notice] = Field(default_factory=list)
    mode: str = "strict"


@register("preflight.blocked", kind="event", version=1)
class PreflightBlocked(Frozen):
    """Strict preflight found blockers: nothing was trained. The envelope's reason code is the first blocker's."""

    plan: RunPlan
    train_plan: TrainPlan | None = None
    checks: list[PreflightCheck]
    blockers: list[Notice]
    memory: MemoryEstimate | None = None


@register("training.started", kind="event", version=3, upcasters=PLAN_V3)
class TrainingStarted(Frozen):
    plan: RunPlan
    base_model: str
    max_steps: int
    train_rows: int
    recipe: str | None = None                # (v3)
    backend: str = "local"                   # (v3)
    resumed_from_step: int | None = None     # (v3) a redelivered job picking up its last checkpoint
    hosted_job_id: str | None = None         # (v3)
    cost_estimate: CostEstimate | None = None  # (v3) hosted: what the job should cost, before it runs


def upcast_progress_v1(payload: dict) -> dict:
    """v1 -> v2: every v1 field is still there (v2 only makes some optional and adds eval fields)."""
    return payload


@register("training.progress", kind="event", version=2, upcasters={1: upcast_progress_v1})
class TrainingProgressed(Frozen):
    """Throttled progress of a local or hosted job; fields a backend does not report are None."""

    step: int
    max_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    examples_per_s: float | None = None
    eta_s: float | None = None
    eval_loss: float | None = None   # (v2) hosted valid loss, or the last mid-training evaluation
    tokens: int | None = None        # (v2) hosted: tokens trained so far


@register("training.checkpointed", kind="event", version=1)
class TrainingCheckpointed(Frozen):
    """A checkpoint was written (atomically) after a mid-training evaluation."""

    step: int
    max_steps: int | None = None
    epoch: float | None = None
    metric_name: str | None = None       # macro_f1, micro_f1, neg_eval_loss, ...
    metric: float | None = None
    eval_loss: float | None = None
    is_best: bool = False
    checkpoint: str                      # local: the checkpoint file's path; hosted: the provider's id
    sha256: str | None = None


@register("training.paused", kind="event", version=1)
class TrainingPaused(Frozen):
    step: int | None = None
    requested_by: str
    hosted_job_id: str | None = None


@register("training.resumed", kind="event", version=1)
class TrainingResumed(Frozen):
    step: int | None = None
    requested_by: str
    hosted_job_id: str | None = None


@register("training.completed", kind="event", version=3, upcasters=PLAN_V3)
class TrainingCompleted(Frozen):
    plan: RunPlan
    base_model: str
    adapter: ArtifactRef | None  # local: a directory manifest (see services.common.artifacts); hosted: None
    manifest: ArtifactRef
    eval: ArtifactRef
    label_space: list[str]
    steps: int
    final_loss: float | None
    examples_per_s: float | None
    wall_s: float
    recipe: str | None = None              # (v3)
    task: str | None = None                # (v3)
    backend: str = "local"                 # (v3)
    best_step: int | None = None           # (v3) the checkpoint exported
    best_metric: float | None = None       # (v3)
    metric_name: str | None = None         # (v3)
    stopped_early: bool = False            # (v3)
    resumed_from_step: int | None = None   # (v3)
    hosted_job_id: str | None = None       # (v3)
    fine_tuned_model: str | None = None    # (v3) hosted: the provider's model id
    trained_tokens: int | None = None      # (v3) hosted: tokens billed, after the job


@register("training.failed", kind="event", version=3, upcasters=PLAN_V3)
class TrainingFailed(StageFailure):
    pass


# --- evaluator ------------------------------------------------------------------------------


class ClassificationMetrics(Frozen):
    accuracy: float
    macro_f1: float
    n: int


@register("eval.completed", kind="event", version=3, upcasters=PLAN_V3)
class EvalCompleted(Frozen):
    plan: RunPlan
    base_model: str
    adapter: ArtifactRef
    eval: ArtifactRef
    candidate: ClassificationMetrics
    base: ClassificationMetrics
    label_space: list[str]


@register("eval.failed", kind="event", version=3, upcasters=PLAN_V3)
class EvalFailed(StageFailure):
    pass


# --- export ---------------------------------------------------------------------------------


@register("export.completed", kind="event", version=3, upcasters=PLAN_V3)
class ExportCompleted(Frozen):
    plan: RunPlan
    base_model: str
    export: ArtifactRef  # directory manifest of the exported files
    format: str
    files: dict[str, str]  # path -> sha256
    candidate: ClassificationMetrics
    base: ClassificationMetrics


@register("export.failed", kind="event", version=3, upcasters=PLAN_V3)
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


@register("registry.failed", kind="event", version=3, upcasters=PLAN_V3)
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
