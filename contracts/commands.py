"""Registered command types: requests that a service acts on."""

from __future__ import annotations

from pydantic import Field

from contracts.common import PLAN_V3, FieldMapping, Frozen, Locator, RunPlan, upcast_plan_v2
from contracts.registry import register


@register("run.start", kind="command", version=3, upcasters=PLAN_V3)
class StartRun(Frozen):
    """Start a run: ingest the locator, then prep, train, evaluate, export and register (the plan)."""

    plan: RunPlan
    requested_by: str = Field("cli", max_length=128)


@register("ingest.commit", kind="command", version=2, upcasters={1: upcast_plan_v2})
class CommitIngest(Frozen):
    """Ingest a source as a run of its own; later stages follow only as far as `until` says."""

    plan: RunPlan
    requested_by: str = Field("cli", max_length=128)


@register("ingest.introspect", kind="command")
class IntrospectSource(Frozen):
    locator: Locator = Field(min_length=1)
    sample_size: int = Field(20, ge=1, le=1000)
    requested_by: str = Field("cli", max_length=128)


@register("ingest.dry_run", kind="command")
class DryRunIngest(Frozen):
    """Map the whole source without committing; no mapping: introspection's proposal (>= 0.80 or force)."""

    locator: Locator = Field(min_length=1)
    mapping: FieldMapping | None = None
    force: bool = False
    sample_size: int = Field(10, ge=0, le=100)
    requested_by: str = Field("cli", max_length=128)


# --- training control (D5): the trainer running the run's job acts on these ---------------------


class TrainingControl(Frozen):
    """Cancel, pause or resume the training of the run named by the envelope's run_id."""

    requested_by: str = Field("cli", max_length=128)
    reason: str | None = Field(None, max_length=500)


@register("training.cancel", kind="command")
class CancelTraining(TrainingControl):
    pass


@register("training.pause", kind="command")
class PauseTraining(TrainingControl):
    pass


@register("training.resume", kind="command")
class ResumeTraining(TrainingControl):
    pass
