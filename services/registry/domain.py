"""Registry decisions without I/O: a target's events folded into its state (the aggregate, D7), and each
command decided against that state: the one event it appends, or a refusal with its reason code."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from contracts.events import (GateVerdict, RolloutSet, VersionPromoted, VersionRejected, VersionRestored,
                              VersionRolledBack, VersionValidated)

# The events that register a version of a target (and so number the target's versions).
REGISTRATIONS = ("registry.version_registered", "registry.hosted_version_registered")
LIFECYCLE = ("registry.validated", "registry.rejected", "registry.promoted", "registry.rolled_back",
             "registry.restored", "registry.rollout_set")
TARGET_EVENTS = REGISTRATIONS + LIFECYCLE
AUTO_ACTOR = "registry:auto_promote"
GATE_ACTOR = "registry:gate"
_VERSION = re.compile(r"^[vV]?([1-9][0-9]{0,8})$")


def next_version(last_registry_event: dict | None) -> int:
    """Versions count up per target; the last registry event of the target carries the current one."""
    if last_registry_event is None:
        return 1
    return int(last_registry_event["payload"]["version"]) + 1


@dataclass
class Version:
    number: int
    status: str                       # candidate, validated, rejected, production, archived
    registered: dict[str, Any]        # the registration's payload
    registered_at: datetime | None
    registration_type: str
    gate: GateVerdict | None = None
    rejection: str | None = None      # the reason, when rejected
    ever_production: bool = False

    @property
    def source_run_id(self) -> str:
        return self.registered.get("source_run_id", "")


@dataclass
class Production:
    """How the version in production got there: the event that made it so."""

    version: int
    since: datetime | None
    event_type: str
    event_id: str
    actor: str
    reason: str
    gate_event_id: str | None
    override: bool = False


@dataclass
class TargetState:
    target: str
    versions: dict[int, Version] = field(default_factory=dict)
    production: Production | None = None
    history: list[int] = field(default_factory=list)   # production versions, oldest first; rollback pops
    rollout_percent: int = 100
    last_sequence: int = 0                             # the stream sequence of the target's last event
    created_at: datetime | None = None
    commands: dict[str, str] = field(default_factory=dict)  # command id -> the event type it caused
    last_event_at: datetime | None = None

    def summary(self, recent: int = 20) -> dict[str, Any]:
        """The state in a few lines of JSON (a refusal carries it)."""
        return {
            "target": self.target, "last_sequence": self.last_sequence,
            "production": self.production.version if self.production else None,
            "previous_production": next((n for n in reversed(self.history[:-1])
                                         if self.versions[n].status == "archived"), None),
            "rollout_percent": self.rollout_percent if self.production else None,
            "versions": {str(n): v.status for n, v in sorted(self.versions.items())[-recent:]},
            "version_count": len(self.versions),
        }


def _at(env: dict) -> datetime | None:
    at = env.get("occurred_at")
    if isinstance(at, str):
        return datetime.fromisoformat(at)
    return at


def apply(state: TargetState, env: dict, seq: int = 0) -> TargetState:
    """Fold one event of the target (an envelope as a dict, payload upcast) into the state, in place."""
    t, p = env["type"], env["payload"]
    at = _at(env)
    if seq:
        state.last_sequence = seq
    state.last_event_at = at
    if state.created_at is None:
        state.created_at = at
    if p.get("command_id"):
        state.commands[p["command_id"]] = t
    if t in REGISTRATIONS:
        gate = p.get("gate")
        state.versions[int(p["version"])] = Version(
            number=int(p["version"]), status="candidate", registered=p, registered_at=at, registration_type=t,
            gate=GateVerdict.model_validate(gate) if gate else None)
        return state
    v = state.versions.get(int(p["version"])) if "version" in p else None
    if v is None:
        return state  # an event about a version the log never registered: nothing to fold
    if t == "registry.validated":
        v.status = "validated"
    elif t == "registry.rejected":
        v.status, v.rejection = "rejected", p.get("reason")
    elif t in ("registry.promoted", "registry.restored"):
        if state.production is not None and state.production.version in state.versions:
            state.versions[state.production.version].status = "archived"
        v.status, v.ever_production = "production", True
        state.history.append(v.number)
        state.rollout_percent = 100
        state.production = Production(v.number, at, t, str(env.get("event_id")), p["actor"], p.get("reason", ""),
                                      p.get("gate_event_id") or (v.gate.event_id if v.gate else None),
                                      bool(p.get("override")))
    elif t == "registry.rolled_back":
        demoted = state.versions.get(int(p["demoted"]))
        if demoted is not None:
            demoted.status = "archived"
        while state.history and state.history[-1] != v.number:
            state.history.pop()  # the rolled-back version, and any rejected since in between
        v.status = "production"
        state.rollout_percent = 100
        state.production = Production(v.number, at, t, str(env.get("event_id")), p["actor"], p.get("reason", ""),
                                      v.gate.event_id if v.gate else None)
    elif t == "registry.rollout_set":
        state.rollout_percent = int(p["percent"])
    return state


def fold(target: str, events: list[tuple[int, dict]]) -> TargetState:
    """The target's state from its events (stream sequence, envelope dict), oldest first."""
    state = TargetState(target)
    for seq, env in events:
        if env["type"] in TARGET_EVENTS and env["payload"].get("target") == target:
            apply(state, env, seq)
        elif seq:
            state.last_sequence = seq  # whatever else sits on the subject still moves the expected sequence
    return state


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


# --- what serves a target (D17) -------------------------------------------------------------------


def serving_entry(state: TargetState) -> dict[str, Any] | None:
    """The `serving` bucket's value for the target (None: nothing in production): what a gateway needs to
    route (model, base pin, rollout) and where the evidence is."""
    prod = state.production
    if prod is None:
        return None
    v = state.versions[prod.version]
    r = v.registered
    pin = r.get("base_model_pin") or {"model": r.get("base_model"), "sha256": None}
    manifest = r.get("manifest") or {}
    return {
        "target": state.target,
        "version": prod.version,
        "model_uri": (r.get("export") or {}).get("uri"),
        "model_sha256": (r.get("export") or {}).get("sha256"),
        "model_size": (r.get("export") or {}).get("size"),
        "hosted_model": r.get("fine_tuned_model"),
        "base_model": pin,
        "dataset_version": r.get("dataset_version"),
        "dataset_sha256": manifest.get("sha256"),
        "test_set_sha256": r.get("test_set_sha256") or (v.gate.test_set_sha256 if v.gate else None),
        "gate_event_id": prod.gate_event_id,
        "rollout_percent": state.rollout_percent,
        "since": prod.since.isoformat() if prod.since else None,
        "by": prod.actor,
        "reason": prod.reason,
        "override": prod.override,
        "source_run_id": v.source_run_id,
        "log_sequence": state.last_sequence,
    }
