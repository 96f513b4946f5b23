"""`tuneline replay gate`: the policy file, and one past decision re-run under another policy (pure)."""

from __future__ import annotations

import argparse

import pytest

from services.cli.replay_cmds import PolicyInvalid, cmd_replay_gate, load_policy, replay_all, replay_event, replay_one
from services.evaluator.gate import GatePolicy, decide


def _records(n: int = 60, better: int = 12) -> list[dict]:
    """Candidate right on every row, the baseline wrong on the first `better` rows; two classes, a project field."""
    out = []
    for i in range(n):
        buckets = {"class": "a" if i % 2 else "b", "project": "x" if i % 3 else "y"}
        out.append({"row_id": f"r{i}", "model": "candidate", "judge_score": 1.0, "buckets": buckets})
        out.append({"row_id": f"r{i}", "model": "classical:tfidf-logreg", "judge_score": 0.0 if i < better else 1.0,
                    "buckets": buckets})
    return out


def _gate(records: list[dict], policy: GatePolicy) -> dict:
    cand = [r for r in records if r["model"] == "candidate"]
    base = {r["row_id"]: r for r in records if r["model"] != "candidate"}
    d = decide([r["judge_score"] for r in cand], [base[r["row_id"]]["judge_score"] for r in cand],
               [r["row_id"] for r in cand], [r["buckets"] for r in cand], policy)
    return {"target": "t", "passed": d.passed, "failed": [{"reason_code": c, "message": ""} for c in d.reason_codes],
            "candidate": "candidate", "baseline": "classical:tfidf-logreg", "records": {},
            "evidence": {**d.as_evidence(), "policy": policy.as_dict()}}


def test_a_stricter_margin_flips_a_passed_decision_and_the_recorded_policy_rederives_it():
    records = _records()
    gate = _gate(records, GatePolicy())
    assert gate["passed"]  # delta 0.2, p tiny
    same = replay_one(gate, records, GatePolicy(), [], gate_event_id="g", run_id="run-1")
    assert same.rederived and same.now_passed and not same.flipped
    strict = replay_one(gate, records, GatePolicy(min_delta=0.3), [], gate_event_id="g", run_id="run-1")
    assert strict.rederived and strict.flipped and strict.now_passed is False
    assert "gate.delta_below_margin" in strict.now_failed


def test_a_bucket_field_the_records_lack_makes_a_decision_unreplayable_rather_than_guessed():
    records = _records()
    gate = _gate(records, GatePolicy())
    r = replay_one(gate, records, GatePolicy(), ["severity"], gate_event_id="g", run_id="run-1")
    assert r.now_passed is None and r.unreplayable.startswith("audit.replay_bucket_field_unrecorded")
    assert replay_one(gate, records, GatePolicy(), ["project"], gate_event_id="g", run_id="run-1").now_passed


def test_a_judge_that_failed_its_validation_fails_under_any_policy():
    records = _records()
    gate = _gate(records, GatePolicy())
    gate["passed"] = False
    gate["failed"] = [{"reason_code": "eval.judge_unvalidated", "message": "60%"}]
    r = replay_one(gate, records, GatePolicy(min_delta=0.0), [], gate_event_id="g", run_id="run-1")
    assert r.rederived and r.now_passed is False and r.now_failed == ["eval.judge_unvalidated"]


def test_unreadable_records_are_reported_and_the_replay_event_lists_only_flips():
    records = _records()
    decisions = [{"event_id": "g1", "run_id": "run-1", "payload": _gate(records, GatePolicy())},
                 {"event_id": "g2", "run_id": "run-2", "payload": _gate(records, GatePolicy())}]

    def read(ref):
        if read.calls:
            raise OSError("gone")
        read.calls += 1
        return records
    read.calls = 0
    settings, policy = load_policy_from({"min_delta": 0.3})
    results = replay_all(decisions, policy, [], read=read)
    assert results[0].flipped and results[1].unreplayable.startswith("audit.replay_records_unreadable")
    event = replay_event(settings, policy, "t", "alice", results)
    assert (event.decisions, event.replayed, event.unreplayable) == (2, 1, 1)
    assert [f.gate_event_id for f in event.flipped] == ["g1"] and event.policy["min_delta"] == 0.3


def load_policy_from(data: dict, tmp=None):
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    return load_policy(f.name)


@pytest.mark.parametrize("text, words", [
    ("min_delta: [", "does not parse"),
    ("- 1\n", "must hold a mapping"),
    ("min_delta: 0.1\nmargin: 3\n", "margin: Extra inputs are not permitted"),
    ("alpha: 1.5\n", "alpha: Input should be less than 1"),
    ("gate: {max_regressed_share: 0}\n", "max_regressed_share must lie in (0, 1]"),
])
def test_a_bad_policy_file_is_one_line_naming_the_problem(tmp_path, text, words):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyInvalid) as exc:
        load_policy(str(path))
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_the_command_refuses_a_bad_policy_with_its_reason_code_and_exit_2_before_touching_the_stack(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("alpha: nope\n")

    class NoStack:
        def urls(self):
            raise AssertionError("the stack must not be reached for a bad policy")

    rc = cmd_replay_gate(NoStack(), argparse.Namespace(policy=str(path), target=None, actor="a", json=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("tuneline replay gate: [audit.replay_policy_invalid]")


def test_the_policy_file_may_be_an_evaluation_file_with_a_gate_section(tmp_path):
    path = tmp_path / "evaluation.yaml"
    path.write_text("gate: {min_delta: 0.1, bucket_fields: [project], safety_buckets: ['class=a']}\n")
    settings, policy = load_policy(str(path))
    assert policy.min_delta == 0.1 and policy.safety_buckets == ("class=a",) and settings.bucket_fields == ["project"]
