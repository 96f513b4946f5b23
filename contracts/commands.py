"""Registered command types: requests that a service acts on."""

from __future__ import annotations

from pydantic import Field

from contracts.common import Frozen, RunPlan
from contracts.registry import register


@register("run.start", kind="command")
class StartRun(Frozen):
    """Start a run: ingest the locator, then prep, train, evaluate, export and register (the plan)."""

    plan: RunPlan
    requested_by: str = Field("cli", max_length=128)
