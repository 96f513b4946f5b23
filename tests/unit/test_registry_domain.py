"""The registry aggregate, pure (D7): every transition of a target's versions and every refusal."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from contracts.commands import PromoteVersion, RejectVersion, RestoreVersion, RollBackTarget, SetRollout
from contracts.events import GateVerdict, Notice
from services.registry import domain
from services.registry.domain import apply, decide, fold, gate_decision, serving_entry

T = "support"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
EXPORT = {"uri": "file:///x", "sha256": "a" * 64, "size": 1}


def registered(version: int, passed: bool | None = True, run: str | None = None) -> dict:
    gate = None if passed is None else GateVerdict(
        event_id=str(uuid.uuid4()), passed=passed, delta=0.1, p_value=0.01, n=100,
        failed=[] if passed else [Notice(reason_code="gate.not_significant", message="p 0.3")]).model_dump(mode="json")
    return {"type": "registry.version_registered", "payload": {
        "target": T, "version": version, "export": EXPORT, "base_model": "all-MiniLM-L6-v2", "gate": gate,
        "source_run_id": run or f"run-{version}", "base_model_pin": {"model": "all-MiniLM-L6-v2", "sha256": "b" * 64}}}


class Log:
    """A target's log being written: events appended the way the registry does."""

    def __init__(self):
        self.events: list[tuple[int, dict]] = []

    def add(self, env: dict) -> dict:
        seq = len(self.events) + 1
        env = {"event_id": str(uuid.uuid4()), "occurred_at": (T0 + timedelta(minutes=seq)).isoformat(), **env}
        self.events.append((seq, env))
        return env

    @property
    def state(self):
        return fold(T, self.events)

    def register(self, version: int, passed: bool | None = True) -> None:
        self.add(registered(version, passed))
        verdict = gate_decision(self.state, version)
        if verdict is not None:
            self.add(as_env(verdict))

    def run(self, command_type: str, cmd, command_id: str | None = None) -> domain.Decision:
        d = decide(self.state, command_type, cmd, command_id or str(uuid.uuid4()))
        if d.event is not None:
            self.add(as_env(d.event))
        return d


def as_env(payload) -> dict:
    from contracts.registry import message_type_of

    return {"type": message_type_of(payload).name, "payload": payload.model_dump(mode="json")}


def promote(v, override=False, reason="better"):
    return PromoteVersion(target=T, version=str(v), reason=reason, actor="alice", override=override)


def test_the_gate_verdict_validates_or_rejects_a_registered_version_with_the_failed_criteria():
    log = Log()
    log.register(1, passed=True)
    log.register(2, passed=False)
    log.add(registered(3, passed=None))
    s = log.state
    assert [s.versions[n].status for n in (1, 2, 3)] == ["validated", "rejected", "candidate"]
    assert "gate.not_significant" in s.versions[2].rejection
    assert gate_decision(s, 1) is None and gate_decision(s, 3) is None  # decided once; no verdict: stays a candidate


def test_promote_makes_production_and_archives_the_previous_in_one_event():
    log = Log()
    log.register(1)
    log.register(2)
    first = log.run("registry.promote", promote(1))
    assert first.event.demoted is None and first.smoke_version == 1
    second = log.run("registry.promote", promote("v2"))
    assert second.event.demoted == 1 and second.event.gate_event_id == log.state.versions[2].gate.event_id
    s = log.state
    assert s.production.version == 2 and s.versions[1].status == "archived" and s.history == [1, 2]
    assert s.production.actor == "alice" and s.production.reason == "better"


def test_a_version_can_be_named_by_the_run_that_produced_it():
    log = Log()
    log.register(1)
    assert log.run("registry.promote", promote("run-1")).event.version == 1


@pytest.mark.parametrize("ref, code", [("7", "registry.version_not_found"), ("run-x", "registry.version_not_found"),
                                       ("v0", "registry.version_not_found")])
def test_promoting_a_version_that_does_not_exist_is_refused(ref, code):
    log = Log()
    log.register(1)
    d = log.run("registry.promote", promote(ref))
    assert d.event is None and d.refusal.reason_code == code


def test_a_target_with_no_versions_is_not_found():
    d = decide(fold(T, []), "registry.promote", promote(1), "c")
    assert d.refusal.reason_code == "registry.target_not_found"


def test_promoting_the_production_version_again_is_refused():
    log = Log()
    log.register(1)
    log.run("registry.promote", promote(1))
    assert log.run("registry.promote", promote(1)).refusal.reason_code == "registry.already_production"


@pytest.mark.parametrize("passed", [False, None])
def test_a_failed_gate_or_no_gate_blocks_promotion_unless_overridden_with_the_override_recorded(passed):
    log = Log()
    log.register(1, passed=passed)
    assert log.run("registry.promote", promote(1)).refusal.reason_code == "registry.promote_blocked"
    d = log.run("registry.promote", promote(1, override=True, reason="hotfix for the outage"))
    assert d.event.override is True and d.event.reason == "hotfix for the outage"
    assert log.state.production.override is True


def test_a_rejected_version_needs_override_to_be_promoted():
    log = Log()
    log.register(1)
    r = log.run("registry.reject", RejectVersion(target=T, version="1", reason="labels drifted", actor="bob"))
    assert r.event.reason == "labels drifted" and log.state.versions[1].status == "rejected"
    assert log.run("registry.promote", promote(1)).refusal.reason_code == "registry.promote_blocked"


def test_reject_refuses_the_production_version_and_an_already_rejected_one():
    log = Log()
    log.register(1)
    log.register(2, passed=False)
    log.run("registry.promote", promote(1))
    for v in ("1", "2"):
        d = log.run("registry.reject", RejectVersion(target=T, version=v, reason="no", actor="bob"))
        assert d.refusal.reason_code == "registry.invalid_transition"


def test_rollback_returns_to_the_previous_production_and_archives_the_current():
    log = Log()
    for v in (1, 2, 3):
        log.register(v)
        log.run("registry.promote", promote(v))
    d = log.run("registry.rollback", RollBackTarget(target=T, reason="errors up", actor="carol"))
    assert (d.event.version, d.event.demoted) == (2, 3)
    d = log.run("registry.rollback", RollBackTarget(target=T, reason="still bad", actor="carol"))
    assert (d.event.version, d.event.demoted) == (1, 2)
    s = log.state
    assert s.production.version == 1 and {s.versions[2].status, s.versions[3].status} == {"archived"}
    assert log.run("registry.rollback", RollBackTarget(target=T, reason="x", actor="c")).refusal.reason_code == \
        "registry.no_previous_production"


def test_rollback_with_nothing_or_one_production_is_refused():
    log = Log()
    log.register(1)
    assert log.run("registry.rollback", RollBackTarget(target=T, reason="x", actor="c")).refusal.reason_code == \
        "registry.no_previous_production"
    log.run("registry.promote", promote(1))
    assert log.run("registry.rollback", RollBackTarget(target=T, reason="x", actor="c")).refusal.reason_code == \
        "registry.no_previous_production"


def test_rollback_skips_a_previous_production_rejected_since():
    log = Log()
    for v in (1, 2, 3):
        log.register(v)
        log.run("registry.promote", promote(v))
    log.run("registry.reject", RejectVersion(target=T, version="2", reason="bad", actor="b"))
    assert log.run("registry.rollback", RollBackTarget(target=T, reason="x", actor="c")).event.version == 1


def test_restore_brings_an_archived_version_back_and_refuses_one_never_promoted():
    log = Log()
    for v in (1, 2):
        log.register(v)
        log.run("registry.promote", promote(v))
    log.register(3)
    never = log.run("registry.restore", RestoreVersion(target=T, version="3", reason="x", actor="d"))
    assert never.refusal.reason_code == "registry.not_archived" and "never promoted" in never.refusal.message
    current = log.run("registry.restore", RestoreVersion(target=T, version="2", reason="x", actor="d"))
    assert current.refusal.reason_code == "registry.not_archived"
    d = log.run("registry.restore", RestoreVersion(target=T, version="1", reason="v2 regressed", actor="d"))
    assert (d.event.version, d.event.demoted, d.smoke_version) == (1, 2, 1)
    assert log.state.production.version == 1 and log.state.versions[2].status == "archived"


def test_rollout_sets_the_percentage_of_the_production_version_and_a_promotion_resets_it():
    log = Log()
    log.register(1)
    assert log.run("registry.set_rollout", SetRollout(target=T, percent=10, actor="e")).refusal.reason_code == \
        "registry.invalid_transition"
    log.run("registry.promote", promote(1))
    d = log.run("registry.set_rollout", SetRollout(target=T, percent=10, actor="e"))
    assert (d.event.percent, d.event.previous_percent, d.event.version) == (10, 100, 1)
    assert serving_entry(log.state)["rollout_percent"] == 10
    log.register(2)
    log.run("registry.promote", promote(2))
    assert log.state.rollout_percent == 100


def test_auto_promotion_only_for_a_validated_version():
    log = Log()
    log.register(1, passed=True)
    log.register(2, passed=False)
    assert domain.auto_promotion(log.state, 2) is None
    d = domain.auto_promotion(log.state, 1)
    assert d.event.auto and d.event.actor == domain.AUTO_ACTOR and d.smoke_version == 1


def test_the_serving_entry_names_the_version_its_model_pin_evidence_and_log_position():
    log = Log()
    assert serving_entry(log.state) is None
    log.register(1)
    log.run("registry.promote", promote(1))
    e = serving_entry(log.state)
    assert e["version"] == 1 and e["model_uri"] == EXPORT["uri"] and e["base_model"]["sha256"] == "b" * 64
    assert e["gate_event_id"] == log.state.versions[1].gate.event_id and e["log_sequence"] == len(log.events)
    assert e["by"] == "alice" and e["rollout_percent"] == 100


def test_the_fold_records_which_commands_were_applied_so_a_redelivery_appends_nothing():
    log = Log()
    log.register(1)
    log.run("registry.promote", promote(1), command_id="cmd-1")
    assert log.state.commands == {"cmd-1": "registry.promoted"}


def test_events_of_another_target_or_unknown_messages_move_only_the_sequence():
    env = registered(1)
    other = {**env, "payload": {**env["payload"], "target": "other"}}
    s = fold(T, [(1, {**env, "occurred_at": T0.isoformat()}), (5, {**other, "occurred_at": T0.isoformat()}),
                 (9, {"type": "", "payload": {}})])
    assert list(s.versions) == [1] and s.last_sequence == 9


def test_a_reason_is_one_line_and_required():
    with pytest.raises(ValueError):
        promote(1, reason="two\nlines")
    with pytest.raises(ValueError):
        promote(1, reason="")


def test_apply_ignores_an_event_about_a_version_never_registered():
    s = fold(T, [])
    apply(s, {"type": "registry.validated", "occurred_at": T0.isoformat(),
              "payload": {"target": T, "version": 4, "actor": "x", "reason": "", "gate_event_id": "g"}}, 3)
    assert s.versions == {} and s.last_sequence == 3
