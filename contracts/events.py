"""Registered event types, one section per stage."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from contracts.common import (PLAN_V4, PLAN_V5, ArtifactRef, FieldMapping, Frozen, RunPlan, TaskShape, upcast_plan_v2,
                              upcast_plan_v3, upcast_plan_v4)
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


@register("ingest.committed", kind="event", version=5, upcasters=PLAN_V5)
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


@register("ingest.failed", kind="event", version=5, upcasters=PLAN_V5)
class IngestFailed(StageFailure):
    pass


# --- prep -----------------------------------------------------------------------------------


@register("prep.cleaned", kind="event", version=4, upcasters={1: upcast_plan_v2, 2: upcast_plan_v3, 3: upcast_plan_v4})
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


class TestSetRef(Frozen):
    """The test set a run is judged on (D14): recorded by a target's first run, reused by later ones."""

    target: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")   # of the test rows file: every row and its row_id
    rows: int = Field(ge=0)
    artifact: ArtifactRef
    origin: Literal["first_run", "new_test_set", "eval_locator"]
    frozen_by_run_id: str


@register("prep.test_set_frozen", kind="event")
class TestSetFrozen(Frozen):
    """A target's test set from now on; published on the target's own subject with the expected last
    sequence, so two first runs racing cannot both freeze one. `origin` says why: a target's first
    run, a user's `--new-test-set`, or an explicit `--eval-locator`."""

    test_set: TestSetRef
    label_space: list[str]
    reason: str = Field("", max_length=500)


@register("prep.prepared", kind="event", version=5, upcasters=PLAN_V5)
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
    # (v4) three splits (D14): `eval` is the validation split the trainer evaluates on; `test` the
    # target's frozen test set, which only the evaluator reads
    test: ArtifactRef | None = None
    test_rows: int = Field(0, ge=0)
    test_set: TestSetRef | None = None


@register("prep.failed", kind="event", version=5, upcasters=PLAN_V5)
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


@register("preflight.passed", kind="event", version=3, upcasters={1: upcast_plan_v3, 2: upcast_plan_v4})
class PreflightPassed(Frozen):
    plan: RunPlan
    train_plan: TrainPlan
    checks: list[PreflightCheck]
    memory: MemoryEstimate | None = None
    warnings: list[Notice] = Field(default_factory=list)
    mode: str = "strict"


@register("preflight.blocked", kind="event", version=3, upcasters={1: upcast_plan_v3, 2: upcast_plan_v4})
class PreflightBlocked(Frozen):
    """Strict preflight found blockers: nothing was trained. The envelope's reason code is the first blocker's."""

    plan: RunPlan
    train_plan: TrainPlan | None = None
    checks: list[PreflightCheck]
    blockers: list[Notice]
    memory: MemoryEstimate | None = None


@register("training.started", kind="event", version=5, upcasters=PLAN_V5)
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


@register("training.restarted", kind="event")
class TrainingRestarted(Frozen):
    """A trigger came back to a trainer (its delivery count above 1: the trainer before died, or its handler
    failed) and training starts again, from a checkpoint or from step 0. The events of this attempt carry
    ids of their own (the delivery is part of them), so none is taken for a duplicate of the last attempt's."""

    delivery: int = Field(ge=2)
    resumed_from_step: int | None = None   # None: no checkpoint, training starts from step 0
    backend: str = "local"


@register("training.trial_completed", kind="event")
class TrialCompleted(Frozen):
    """One trial of a tuned run (`plan.tuning`): a training with `settings` (the tuned recipe fields) on
    the train split, scored on the validation split (`metric`: the best checkpoint's). A trial that
    diverged, or that the budget cut off, is recorded with its status and no metric; the run goes on."""

    trial: int = Field(ge=1)
    trials: int = Field(ge=1)                # the most the plan allows
    settings: dict[str, Any]
    status: Literal["completed", "diverged", "cut_off"]
    metric_name: str | None = None
    metric: float | None = None
    best_step: int | None = None
    steps: int = Field(0, ge=0)
    wall_s: float = Field(ge=0)
    train_rows: int = Field(ge=0)
    validation_rows: int = Field(ge=0)
    is_best: bool = False                    # the best trial so far (ties: the earlier one)
    reason_code: str | None = None           # why a trial has no metric (training.diverged, training.timeout)
    message: str | None = Field(None, max_length=2000)


def upcast_tuning_completed_v1(payload: dict) -> dict:
    """v1 predates taking the winner's training over: its final model was trained anew after the search."""
    return {**payload, "final_from_trial": None}


@register("training.tuning_completed", kind="event", version=2, upcasters={1: upcast_tuning_completed_v1})
class TuningCompleted(Frozen):
    """The search is over: which trial won, with what settings, and why it stopped. The final model is the
    winner's own training (`final_from_trial`; training.started resumes at its last step, training.completed
    follows). The splits it read
    are named by sha256: the train and validation splits, never the test set."""

    trials_run: int = Field(ge=0)
    trials_planned: int = Field(ge=1)
    budget_minutes: float = Field(gt=0)
    stopped_by_budget: bool                  # trials left that the budget would not fit
    best_trial: int | None = None            # None: every trial failed; the recipe's own settings are trained
    best_settings: dict[str, Any]
    metric_name: str | None = None
    best_metric: float | None = None
    baseline_metric: float | None = None     # trial 1: the recipe's own settings
    final_from_trial: int | None = None      # the final model is this trial's training (its checkpoints taken
                                             # over, not trained again); None: trained anew after the search
    wall_s: float = Field(ge=0)
    train_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    validation_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@register("training.completed", kind="event", version=5, upcasters=PLAN_V5)
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
    train: ArtifactRef | None = None       # (v4) the train split (the classical baseline trains on it)
    test: ArtifactRef | None = None        # (v4) the frozen test set (None: a v3 run, scored on `eval`)
    test_set: TestSetRef | None = None     # (v4)


@register("training.failed", kind="event", version=5, upcasters=PLAN_V5)
class TrainingFailed(StageFailure):
    pass


# --- trainer: the hosted job archive (D12) ----------------------------------------------------
# What a hosted provider knows about a job, kept in the audit spine before the provider drops it: its
# raw events, its job object at each status, its checkpoints and files. Written by the trainer while it
# follows a job and by `tuneline import openai-jobs` for jobs trained outside Tuneline (an imported run).


class ProviderJobEvent(Frozen):
    """One job event as the provider listed it (OpenAI `fine_tuning.job.event`); `data` untyped, as documented."""

    id: str
    created_at: int
    level: str
    message: str
    type: str | None = None
    data: dict[str, Any] | None = None


@register("training.provider_event", kind="event", version=1)
class ProviderEventsArchived(Frozen):
    """A batch of a hosted job's provider events, oldest first. Batching and deduplication:
    services/trainer/hosted/archive.py (ProviderEventBatcher)."""

    provider: str
    hosted_job_id: str
    events: list[ProviderJobEvent] = Field(min_length=1)


@register("training.provider_job", kind="event", version=1)
class ProviderJobObserved(Frozen):
    """The provider's job object (hyperparameters, trained tokens, result files, error) as it was when
    its status changed, as the provider serialised it."""

    provider: str
    hosted_job_id: str
    status: str
    job: dict[str, Any]


class ProviderCheckpoint(Frozen):
    id: str
    step: int
    fine_tuned_model_checkpoint: str
    created_at: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class ProviderFile(Frozen):
    """A file a hosted job names. `artifact` is its copy in the artifact store (its sha256 is the lineage);
    None with `unavailable` when the provider no longer served it."""

    role: Literal["training", "validation", "result"]
    file_id: str
    filename: str | None = None
    size: int | None = None
    purpose: str | None = None
    artifact: ArtifactRef | None = None
    unavailable: Notice | None = None


@register("training.provider_archived", kind="event", version=1)
class ProviderJobArchived(Frozen):
    """A hosted job's archive is whole: published after its provider events and job snapshots, it names
    its checkpoints and files. `imported`: archived by `tuneline import openai-jobs`, not by a Tuneline run."""

    provider: str
    hosted_job_id: str
    status: str
    base_model: str
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    created_at: int | None = None
    finished_at: int | None = None
    events_archived: int = Field(ge=0)
    checkpoints: list[ProviderCheckpoint] = Field(default_factory=list)
    files: list[ProviderFile] = Field(default_factory=list)
    imported: bool = False


# --- evaluator ------------------------------------------------------------------------------


class ClassificationMetrics(Frozen):
    accuracy: float
    macro_f1: float
    n: int


class ModelReport(Frozen):
    """One model's scores on the test set (from services.common.metrics): classification metrics per
    class and field, judge mean, latency and cost. `model` says what was scored: "candidate",
    "production:v3", "classical:tfidf-logreg", "prompt:gpt-4o-mini"."""

    model: str
    n: int = Field(ge=0)
    judge_mean: float
    metrics: dict[str, Any]                  # accuracy, micro/macro F1, per_class, confusion, per field
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    usd_per_1k: float | None = None
    tokens_median: float | None = None
    unparseable: int = Field(0, ge=0)        # outputs that named no label / no valid JSON


class JudgeRef(Frozen):
    """Which judge scored the rows: what `judge.validated` and the gate name."""

    judge_id: str                           # "rubric:<weights sha256[:12]>" or "llm:<model>:<prompt sha256[:12]>"
    kind: Literal["rubric", "llm"]
    model: str | None = None
    prompt_sha256: str | None = None
    weights: dict[str, float] = Field(default_factory=dict)


@register("judge.validated", kind="event")
class JudgeValidated(Frozen):
    """The judge was run over the test set's gold outputs and known-wrong outputs before it gates
    (D16): its agreement with the truth, and whether that is enough."""

    judge: JudgeRef
    test_set_sha256: str
    n_gold: int = Field(ge=0)
    n_wrong: int = Field(ge=0)
    accuracy: float          # share of gold scored above the midpoint and wrong below it
    cohen_kappa: float
    gold_mean: float
    wrong_mean: float
    min_agreement: float
    passed: bool


@register("eval.gate_decided", kind="event")
class GateDecided(Frozen):
    """The promotion gate's decision (D13) and all the evidence to re-derive it from `records`."""

    target: str
    passed: bool
    failed: list[Notice]                    # every failed criterion with its reason code
    candidate: str                          # what was scored, as in ModelReport.model
    baseline: str
    baseline_kind: Literal["production", "prompt", "classical"]
    records: ArtifactRef                    # the per-row records both models were judged on
    test_set_sha256: str
    judge_id: str
    evidence: dict[str, Any]                # n, means, delta and CI, test, statistic, p, effect size, buckets, regressions, policy


@register("eval.completed", kind="event", version=5, upcasters=PLAN_V5)
class EvalCompleted(Frozen):
    """v4: the candidate against its baseline (production, a prompt baseline or a classical one; D15)
    on the frozen test set, per-row records, judge and gate. `base` is the baseline's metrics, which
    export and the registry carry on; v3 compared with the base encoder under an untrained head."""

    plan: RunPlan
    base_model: str
    adapter: ArtifactRef | None
    eval: ArtifactRef                       # the rows scored (v4: the test set)
    candidate: ClassificationMetrics
    base: ClassificationMetrics
    label_space: list[str]
    baseline_kind: Literal["production", "prompt", "classical", "base_model"] = "base_model"  # (v4)
    candidate_report: ModelReport | None = None   # (v4)
    baseline_report: ModelReport | None = None    # (v4)
    records: ArtifactRef | None = None            # (v4) per-row records (D16)
    test_set_sha256: str | None = None            # (v4)
    judge: JudgeRef | None = None                 # (v4)
    gate_passed: bool | None = None               # (v4) eval.gate_decided says why
    warnings: list[Notice] = Field(default_factory=list)  # (v4) e.g. eval.degenerate_model


@register("eval.failed", kind="event", version=5, upcasters=PLAN_V5)
class EvalFailed(StageFailure):
    pass


# --- export ---------------------------------------------------------------------------------


class GateVerdict(Frozen):
    """The gate's decision on a version (eval.gate_decided, D13) as the registry keeps it: enough to
    validate or reject the version and to answer "on what evidence" without the evaluator."""

    event_id: str                           # of the eval.gate_decided event: the evidence
    passed: bool
    failed: list[Notice] = Field(default_factory=list)
    baseline: str | None = None
    baseline_kind: str | None = None
    test_set_sha256: str | None = None
    judge_id: str | None = None
    n: int | None = None
    delta: float | None = None
    p_value: float | None = None


def upcast_export_v4(payload: dict) -> dict:
    """v4 -> v5: the evidence fields are new and default to None (a v4 export carries no gate verdict)."""
    return payload


class FormatParity(Frozen):
    """An exported format loaded fresh in its own runtime against the trained model in PyTorch, on the test
    rows: predicted labels, max |logit diff| (fp32 formats: <= 1e-4), accuracy and its drop (quantised)."""

    rows: int
    labels_identical: bool
    label_agreement: float
    max_abs_logit_diff: float
    accuracy: float | None = None
    reference_accuracy: float | None = None
    accuracy_drop: float | None = None


class ExportedFormat(Frozen):
    """One format of an export (services/export/formats.py): shipped under `path` in the export folder with
    its parity, or failed with a registered reason code and the converter's message."""

    format: str
    status: Literal["shipped", "failed"]
    path: str | None = None
    reason_code: str | None = None
    message: str | None = None
    parity: FormatParity | None = None
    runtime: str | None = None  # what ran the parity check (e.g. onnxruntime; GGUFReader + transformers)

    @field_validator("reason_code")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None and not is_registered(value):
            raise ValueError(f"reason code {value!r} is not registered in contracts.reason_codes")
        return value


@register("export.completed", kind="event", version=6, upcasters={**PLAN_V4, 4: upcast_export_v4, 5: upcast_plan_v4})
class ExportCompleted(Frozen):
    """v5: also what the registry needs from the evaluation (copied from eval.completed and its
    eval.gate_decided): the gate verdict, the per-row records and the test rows they are about (the
    registry's smoke check reproduces them), the label space. v6: each format's outcome and parity
    (`formats`) and the base model's weights sha256 as the export manifest pins it."""

    plan: RunPlan
    base_model: str
    export: ArtifactRef  # directory manifest of the exported files
    format: str
    files: dict[str, str]  # path -> sha256
    candidate: ClassificationMetrics
    base: ClassificationMetrics
    gate: GateVerdict | None = None            # (v5) None: no gate decision was found for the run
    records: ArtifactRef | None = None         # (v5) per-row records (D16)
    test: ArtifactRef | None = None            # (v5) the test rows the records are about
    test_set_sha256: str | None = None         # (v5)
    label_space: list[str] = Field(default_factory=list)  # (v5)
    dataset_version: str | None = None         # (v5) lineage, when the run's events carry it
    manifest: ArtifactRef | None = None        # (v5)
    formats: list[ExportedFormat] = Field(default_factory=list)  # (v6) the adapter first, then merged, onnx, ...
    base_model_sha256: str | None = None       # (v6) weights sha256 pinned in the manifest


@register("export.reexported", kind="event")
class ExportReexported(Frozen):
    """The answer to `export.run`: the run's adapter exported again in the formats asked for, in a new export
    folder (the adapter and those formats, with their own manifest); a format that failed is in `formats`
    with its reason code. The registry does not register it: the run's version is its first export."""

    source_run_id: str               # the run whose adapter was exported
    base_model: str
    export: ArtifactRef
    files: dict[str, str]
    formats: list[ExportedFormat]
    requested: list[str]
    base_model_sha256: str | None = None
    source: ArtifactRef | None = None  # the run's adapter that was exported


@register("export.failed", kind="event", version=5, upcasters=PLAN_V5)
class ExportFailed(StageFailure):
    pass


# --- registry -------------------------------------------------------------------------------


class BaseModelPin(Frozen):
    """The base model a version's adapter was trained on, pinned by the sha256 of its weights files,
    so that an adapter is never served (or smoke-checked) on another base."""

    model: str
    sha256: str | None = None   # None: not resolvable to local weights when registered (a hub id offline)


def upcast_registered_v1(payload: dict) -> dict:
    """v1 -> v2: the pin and the evidence are new and default to None (v1 versions carry no gate verdict)."""
    return payload


@register("registry.version_registered", kind="event", version=2, upcasters={1: upcast_registered_v1})
class VersionRegistered(Frozen):
    """v2: with the base model pin, the gate verdict, the per-row records and test rows (for the smoke
    check before a promotion) and what lineage the export carried."""

    target: str
    version: int = Field(ge=1)
    status: str = "candidate"
    export: ArtifactRef
    base_model: str
    candidate: ClassificationMetrics
    base: ClassificationMetrics
    source_run_id: str
    base_model_pin: BaseModelPin | None = None   # (v2)
    gate: GateVerdict | None = None              # (v2)
    records: ArtifactRef | None = None           # (v2)
    test: ArtifactRef | None = None              # (v2)
    test_set_sha256: str | None = None           # (v2)
    label_space: list[str] = Field(default_factory=list)  # (v2)
    dataset_version: str | None = None           # (v2)
    manifest: ArtifactRef | None = None          # (v2)


@register("registry.hosted_version_registered", kind="event", version=1)
class HostedVersionRegistered(Frozen):
    """A version of a target that a hosted provider trained outside Tuneline's pipeline (an imported job):
    no export artifact and no Tuneline evaluation, so it says what it is instead. It counts in the
    target's version sequence like registry.version_registered. Lineage: the training file's sha256
    (None when the provider no longer served the file)."""

    target: str
    version: int = Field(ge=1)
    status: str = "candidate"
    provider: str
    hosted_job_id: str
    base_model: str
    fine_tuned_model: str
    training_file_sha256: str | None = None
    validation_file_sha256: str | None = None
    source_run_id: str


@register("registry.failed", kind="event", version=5, upcasters=PLAN_V5)
class RegistryFailed(StageFailure):
    pass


# The lifecycle of a target's versions (D7), each event on the target's own subject and appended with the
# expected last subject sequence: candidate -> validated | rejected; validated -> production (promoted);
# production -> archived (demoted by the next promotion, or rolled back); archived -> production (restored).


class RegistryAct(Frozen):
    """Who did it and why; `command_id`: the command it answers (None: the registry acted on its own,
    on a gate decision or the auto_promote policy)."""

    target: str
    actor: str = Field(min_length=1, max_length=128)
    reason: str = Field(max_length=500)
    command_id: str | None = None


@register("registry.validated", kind="event")
class VersionValidated(RegistryAct):
    """The gate passed: the version may be promoted."""

    version: int = Field(ge=1)
    gate_event_id: str


@register("registry.rejected", kind="event")
class VersionRejected(RegistryAct):
    """The gate failed (`failed`: its criteria) or a person rejected the version (a one-line reason)."""

    version: int = Field(ge=1)
    gate_event_id: str | None = None
    failed: list[Notice] = Field(default_factory=list)


class SmokeCheck(Frozen):
    """The export loaded on its pinned base and re-ran on test rows: its outputs against the evaluator's."""

    rows: int = Field(ge=0)
    matched: int = Field(ge=0)
    passed: bool
    base_model_sha256: str | None = None
    mismatched_row_ids: list[str] = Field(default_factory=list)
    skipped: str | None = None  # why no check ran (disabled by the registry's settings)


@register("registry.promoted", kind="event")
class VersionPromoted(RegistryAct):
    """One event, atomic by construction: `version` is production from now on and `demoted` (the previous
    production, if any) is archived. `override`: promoted although its gate failed or it was rejected,
    with `reason` the override's reason."""

    version: int = Field(ge=1)
    demoted: int | None = None
    gate_event_id: str | None = None
    override: bool = False
    auto: bool = False                # by the target's auto_promote policy
    smoke: SmokeCheck | None = None


@register("registry.rolled_back", kind="event")
class VersionRolledBack(RegistryAct):
    """Production goes back to the previous production (`version`); `demoted` is archived."""

    version: int = Field(ge=1)
    demoted: int = Field(ge=1)


@register("registry.restored", kind="event")
class VersionRestored(RegistryAct):
    """An archived version is production again; `demoted` (the production it replaces) is archived."""

    version: int = Field(ge=1)
    demoted: int | None = None
    gate_event_id: str | None = None
    smoke: SmokeCheck | None = None


@register("registry.rollout_set", kind="event")
class RolloutSet(RegistryAct):
    """A staged rollout: the share of traffic the production version takes (a gateway reads `serving`)."""

    version: int = Field(ge=1)
    percent: int = Field(ge=0, le=100)
    previous_percent: int = Field(ge=0, le=100)


@register("registry.command_refused", kind="event")
class RegistryCommandRefused(Frozen):
    """A registry command that changed nothing; the envelope's reason code says why (registry.conflict,
    registry.promote_blocked, registry.smoke_failed, ...). Published outside the target's log (its subject
    is not the target's), so a refusal never moves the target's sequence. `state`: the target as the
    registry found it (for registry.conflict, the state that won)."""

    command: str
    target: str
    version: str | None = None
    actor: str
    message: str
    state: dict[str, Any] = Field(default_factory=dict)
    smoke: SmokeCheck | None = None


# --- replay (D13, D16): counterfactual policies over past evidence ---------------------------


class ReplayedDecision(Frozen):
    """One past gate decision under the replayed policy: what it was and what it would have been."""

    gate_event_id: str
    run_id: str
    target: str
    was_passed: bool
    now_passed: bool | None = None      # None: not replayable (see `unreplayable`)
    now_failed: list[str] = Field(default_factory=list)   # reason codes under the replayed policy
    unreplayable: str | None = None     # why (records unreadable, a bucket field the records lack)


@register("gate.replayed", kind="event")
class GateReplayed(Frozen):
    """Someone asked what past gate decisions would have been under another policy (`tuneline replay gate`).
    Read-only: it changes no version. Published on its own subject (not a target's registry subject, whose
    expected sequence it must not move), by the CLI that ran the replay; `flipped` lists only the
    decisions that would change."""

    policy: dict[str, Any]               # the replayed policy in full
    policy_sha256: str
    target: str | None = None            # None: every target
    requested_by: str = Field(min_length=1, max_length=128)
    decisions: int = Field(ge=0)         # past gate decisions looked at
    replayed: int = Field(ge=0)          # of those, re-derived under the policy
    flipped: list[ReplayedDecision] = Field(default_factory=list)
    unreplayable: int = Field(0, ge=0)


@register("projection.replayed", kind="event")
class ProjectionReplayed(Frozen):
    """An operator rebuilt a projection blue/green (`tuneline replay projection NAME`, D8): version `version`
    built from run_events beside the live one up to `to_position`, compared with it row by row, and made
    the live one (when identical, or when asked) or kept aside. Published by the CLI that ran it."""

    projection: str = Field(min_length=1, max_length=64)
    requested_by: str = Field(min_length=1, max_length=128)
    to_position: int = Field(ge=0)
    events: int = Field(ge=0)             # run_events rows replayed into the new version
    live_version: int = Field(ge=1)       # the version readers used when the replay began
    version: int = Field(ge=1)            # the version it built
    differences: dict[str, int] = Field(default_factory=dict)  # per table: rows only in one version or changed
    outcome: Literal["switched", "kept_aside", "failed"]
    forced: bool = False                  # switched although the versions differ (--switch)
    error: str | None = None
    wall_s: float = Field(ge=0)


@register("store.replayed", kind="event")
class StoreReplayed(Frozen):
    """An operator rebuilt run_events from the JetStream stream into a fresh database and diffed it with the
    live store (`tuneline replay store --into URL`): positions, event ids and hashes, from `compared_from` to
    `compared_to`. `differences` counts per kind: only_live, only_rebuilt (positions held by one store
    only), event_id (another event at a position), hash (another chain link), skipped (positions one store
    skipped and the other recorded). Published by the CLI (or the API) that ran it."""

    requested_by: str = Field(min_length=1, max_length=128)
    into: str = Field(max_length=512)     # the rebuilt database, as host/name: never its credentials
    stream_first: int = Field(ge=0)
    stream_last: int = Field(ge=0)
    events: int = Field(ge=0)             # rows the rebuild recorded
    compared_from: int = Field(ge=0)
    compared_to: int = Field(ge=0)
    differences: dict[str, int] = Field(default_factory=dict)
    samples: list[str] = Field(default_factory=list, max_length=20)
    outcome: Literal["identical", "differs", "failed"]
    error: str | None = None
    wall_s: float = Field(ge=0)


@register("consumer.replayed", kind="event")
class ConsumerReplayed(Frozen):
    """An operator re-drove one service's durable consumer from a stream position (`tuneline replay consumer`):
    in place (the consumer rewound; its handlers are idempotent, D3) or in a sandbox (the recorded messages
    it took fed to a copy of the service on a stream and database of their own, its outputs diffed with what
    run_events says the consumer emitted: only_recorded, only_replayed, changed)."""

    durable: str = Field(min_length=1, max_length=128)
    mode: Literal["in_place", "sandbox"]
    from_sequence: int | None = Field(None, ge=1)
    from_time: str | None = Field(None, max_length=64)   # ISO 8601, as asked
    requested_by: str = Field(min_length=1, max_length=128)
    inputs: int = Field(ge=0)             # recorded messages of the consumer's subject from the position
    outputs: int = Field(0, ge=0)         # sandbox: events the copy emitted
    differences: dict[str, int] = Field(default_factory=dict)
    samples: list[str] = Field(default_factory=list, max_length=20)
    outcome: Literal["redriven", "identical", "differs", "failed"]
    error: str | None = None
    wall_s: float = Field(ge=0)


@register("run.replayed", kind="event")
class RunReplayed(Frozen):
    """The first event of a run re-run from a stage with the same inputs (`tuneline replay run RUN_ID --from
    STAGE`): the envelope's run is the new one, `origin_run_id` the run it repeats. The stage's recorded
    trigger follows under the new run, caused by this event, and the stage takes it as it took the original."""

    origin_run_id: str = Field(min_length=1, max_length=128)
    from_stage: str = Field(min_length=1, max_length=32)
    trigger_event_id: str = Field(min_length=1, max_length=64)   # the origin's trigger, re-issued
    trigger_type: str = Field(min_length=1, max_length=128)
    requested_by: str = Field(min_length=1, max_length=128)


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
