"""Registered command types: requests that a service acts on."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from contracts.common import PLAN_V5, FieldMapping, Frozen, Locator, RunPlan, upcast_plan_v2, upcast_plan_v3, upcast_plan_v4
from contracts.registry import register


@register("run.start", kind="command", version=5, upcasters=PLAN_V5)
class StartRun(Frozen):
    """Start a run: ingest the locator, then prep, train, evaluate, export and register (the plan)."""

    plan: RunPlan
    requested_by: str = Field("cli", max_length=128)


@register("ingest.commit", kind="command", version=4,
          upcasters={1: upcast_plan_v2, 2: upcast_plan_v3, 3: upcast_plan_v4})
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


# --- the registry (D7): acts on a target's versions; answered by a registry event on the target's
# subject, or by registry.command_refused with a reason code. The event a command causes derives its id
# from the command's event id (D3), so a redelivered command appends nothing twice.


def _one_line(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError("a reason is one line")
    return value


class RegistryCommand(Frozen):
    """`actor`: who asks (the CLI: the OS user or --actor; the API: the token's subject). `expected_sequence`:
    the target log's last sequence the actor decided on; when the log has moved on, the command is refused
    with registry.conflict and the current state (None: the registry's own read, which only protects
    against another registry process)."""

    target: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    reason: Annotated[str, AfterValidator(_one_line)] = Field(min_length=1, max_length=500)
    actor: str = Field(min_length=1, max_length=128)
    expected_sequence: int | None = Field(None, ge=0)


@register("export.run", kind="command")
class ExportRun(Frozen):
    """Export run `run_id`'s adapter again, in `formats` (e.g. onnx-int8), into a new export folder; answered
    by export.reexported or export.failed. Sent as a run of its own (`export-...`, as registry commands
    are), so that a refused re-export does not fail the run it names."""

    run_id: str = Field(min_length=1, max_length=200)
    formats: list[str] = Field(min_length=1, max_length=16)
    requested_by: str = Field("cli", max_length=128)


@register("registry.promote", kind="command")
class PromoteVersion(RegistryCommand):
    """Make `version` (a number, vN, or the run id that produced it) production; the current production is
    archived. A version whose gate failed, or that was rejected, needs `override` (the reason is recorded)."""

    version: str = Field(min_length=1, max_length=128)
    override: bool = False


@register("registry.reject", kind="command")
class RejectVersion(RegistryCommand):
    version: str = Field(min_length=1, max_length=128)


@register("registry.rollback", kind="command")
class RollBackTarget(RegistryCommand):
    """Production goes back to the version that was production before it."""


@register("registry.restore", kind="command")
class RestoreVersion(RegistryCommand):
    """An archived version (one that was production once) becomes production again."""

    version: str = Field(min_length=1, max_length=128)


@register("registry.set_rollout", kind="command")
class SetRollout(RegistryCommand):
    percent: int = Field(ge=0, le=100)
    reason: Annotated[str, AfterValidator(_one_line)] = Field("staged rollout", min_length=1, max_length=500)
