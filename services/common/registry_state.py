"""A deployment target's registry log folded into its state (the aggregate, D7) and its `serving` entry
(D17): pure, read by the registry (which decides commands against it), the CLI and the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from contracts.events import GateVerdict

# The events that register a version of a target (and so number the target's versions).
REGISTRATIONS = ("registry.version_registered", "registry.hosted_version_registered")
LIFECYCLE = ("registry.validated", "registry.rejected", "registry.promoted", "registry.rolled_back",
             "registry.restored", "registry.rollout_set")
TARGET_EVENTS = REGISTRATIONS + LIFECYCLE


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
