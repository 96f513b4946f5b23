"""Registry decisions without I/O: a target's events folded into its state (the aggregate, D7), and each
command decided against that state: the one event it appends, or a refusal with its reason code."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from contracts.events import (GateVerdict, RolloutSet, VersionPromoted, VersionRejected, VersionRestored,
                              VersionRolledBack, VersionValidated)

# The fold and the serving entry are shared with the API and the CLI: defined once in services/common, and
# re-exported here for the registry's own modules.
from services.common.registry_state import (REGISTRATIONS, TargetState, Version, apply, fold,  # noqa: F401
                                            serving_entry)

AUTO_ACTOR = "registry:auto_promote"
GATE_ACTOR = "registry:gate"
_VERSION = re.compile(r"^[vV]?([1-9][0-9]{0,8})$")


def next_version(last_registry_event: dict | None) -> int:
    """Versions count up per target; the last registry event of the target carries the current one."""
    if last_registry_event is None:
        return 1
    return int(last_registry_event["payload"]["version"]) + 1


# --- decisions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    reason_code: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What a command does: `event` to append, or `refusal`. `smoke_version`: the version to smoke-check
    before the event is appended (a promotion or a restore)."""

    event: BaseModel | None = None
    refusal: Refusal | None = None
    smoke_version: int | None = None


def refuse(code: str, message: str) -> Decision:
    return Decision(refusal=Refusal(code, message))


def resolve_version(state: TargetState, ref: str) -> Version | Refusal:
    """A version named as N, vN, or the run id that produced it."""
    if not state.versions:
        return Refusal("registry.target_not_found", f"target {state.target} has no registered version")
    m = _VERSION.fullmatch(ref.strip())
    if m:
        v = state.versions.get(int(m.group(1)))
        if v is None:
            return Refusal("registry.version_not_found",
                           f"target {state.target} has no version {ref} (versions 1..{max(state.versions)})")
        return v
    for v in state.versions.values():
        if v.source_run_id == ref:
            return v
    return Refusal("registry.version_not_found", f"target {state.target} has no version {ref!r} "
                                                 f"(neither a version number nor a run registered on it)")


def gate_decision(state: TargetState, version: int) -> BaseModel | None:
    """On registration: the gate's verdict makes the version validated or rejected (its failed criteria
    the reason). None: no verdict (a hosted import, a v4 export), or already decided."""
    v = state.versions.get(version)
    if v is None or v.status != "candidate" or v.gate is None:
        return None
    if v.gate.passed:
        return VersionValidated(target=state.target, version=version, gate_event_id=v.gate.event_id,
                                actor=GATE_ACTOR, reason=f"gate passed ({_evidence_words(v.gate)})")
    failed = "; ".join(f"{n.reason_code}: {n.message}" for n in v.gate.failed) or "gate failed"
    return VersionRejected(target=state.target, version=version, gate_event_id=v.gate.event_id, failed=v.gate.failed,
                           actor=GATE_ACTOR, reason=failed[:500])


def auto_promotion(state: TargetState, version: int) -> Decision | None:
    """The auto_promote policy: a validated version whose gate passed is promoted without a command."""
    v = state.versions.get(version)
    if v is None or v.status != "validated" or v.gate is None or not v.gate.passed:
        return None
    return Decision(event=VersionPromoted(
        target=state.target, version=version, demoted=state.production.version if state.production else None,
        gate_event_id=v.gate.event_id, actor=AUTO_ACTOR, auto=True,
        reason=f"auto_promote: gate passed ({_evidence_words(v.gate)})"), smoke_version=version)


def _evidence_words(g: GateVerdict) -> str:
    parts = [f"{k} {val:.4g}" if isinstance(val, float) else f"{k} {val}"
             for k, val in (("delta", g.delta), ("p", g.p_value), ("n", g.n)) if val is not None]
    return ", ".join(parts) or f"evidence {g.event_id}"


def decide(state: TargetState, command_type: str, cmd: Any, command_id: str) -> Decision:
    """A registry command against the target's state: the event to append, or why not."""
    common = dict(target=state.target, actor=cmd.actor, reason=cmd.reason, command_id=command_id)
    if command_type == "registry.rollback":
        if state.production is None:
            return refuse("registry.no_previous_production", f"target {state.target} has nothing in production")
        previous = next((n for n in reversed(state.history[:-1]) if state.versions[n].status == "archived"), None)
        if previous is None:
            return refuse("registry.no_previous_production",
                          f"target {state.target} has no previous production version to roll back to "
                          f"(v{state.production.version} is its first, or the earlier ones were rejected since)")
        return Decision(event=VersionRolledBack(version=previous, demoted=state.production.version, **common))
    if command_type == "registry.set_rollout":
        if state.production is None:
            return refuse("registry.invalid_transition", f"target {state.target} has nothing in production to roll out")
        return Decision(event=RolloutSet(version=state.production.version, percent=cmd.percent,
                                         previous_percent=state.rollout_percent, **common))
    found = resolve_version(state, cmd.version)
    if isinstance(found, Refusal):
        return Decision(refusal=found)
    v = found
    current = state.production.version if state.production else None
    if command_type == "registry.promote":
        if v.status == "production":
            return refuse("registry.already_production", f"v{v.number} of {state.target} is already in production")
        blocked = _promote_blocker(v)
        if blocked and not cmd.override:
            return refuse("registry.promote_blocked", f"v{v.number} of {state.target}: {blocked}; "
                                                      "promote it with --override and a reason to go ahead anyway")
        return Decision(event=VersionPromoted(version=v.number, demoted=current, override=bool(blocked),
                                              gate_event_id=v.gate.event_id if v.gate else None, **common),
                        smoke_version=v.number)
    if command_type == "registry.reject":
        if v.status in ("production", "rejected"):
            hint = "roll back or promote another version first" if v.status == "production" else "already rejected"
            return refuse("registry.invalid_transition", f"v{v.number} of {state.target} is {v.status}: {hint}")
        return Decision(event=VersionRejected(version=v.number, gate_event_id=v.gate.event_id if v.gate else None,
                                              **common))
    if command_type == "registry.restore":
        if v.status != "archived":
            why = ("in production now" if v.status == "production"
                   else f"{v.status}, never promoted" if not v.ever_production else v.status)
            return refuse("registry.not_archived", f"v{v.number} of {state.target} is {why}: only an archived "
                                                   "version (one that was production) can be restored")
        return Decision(event=VersionRestored(version=v.number, demoted=current,
                                              gate_event_id=v.gate.event_id if v.gate else None, **common),
                        smoke_version=v.number)
    raise ValueError(f"not a registry command: {command_type}")


def _promote_blocker(v: Version) -> str | None:
    """Why promoting v needs an override, or None when its evidence allows it."""
    if v.status == "rejected":
        return f"rejected ({v.rejection or 'no reason given'})"
    if v.gate is None:
        return "no gate decision (nothing says it beats what serves now)"
    if not v.gate.passed:
        return "its gate failed (" + (", ".join(n.reason_code for n in v.gate.failed) or "failed") + ")"
    return None
