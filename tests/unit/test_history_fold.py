"""The History projection's fold and the dataset numbering, without a database."""

from __future__ import annotations

from contracts.commands import CancelTraining
from contracts.envelope import Severity
from contracts.events import (GateDecided, Notice, PrepPrepared, TrainingFailed, VersionPromoted, VersionRejected,
                              VersionRestored, VersionRolledBack, VersionValidated)
from services.audit.projections.history import HistoryState, fold, next_dataset_number
from tests.factories import envelope, failed_run, plan, ref, successful_run


def _rows(envs, first: int = 1) -> list[dict]:
    return [dict(global_position=first + i, type=e.type, run_id=e.run_id, occurred_at=e.occurred_at,
                 reason_code=e.reason_code, payload=e.payload, event_id=e.event_id) for i, e in enumerate(envs)]


def _ds(major, minor, patch, space, rows):
    return {"major": major, "minor": minor, "patch": patch, "label_space": space, "rows": rows}


def test_a_targets_datasets_are_numbered_major_for_a_new_label_space_minor_for_added_rows_patch_otherwise():
    assert next_dataset_number([], ["a", "b"], 100) == (1, 0, 0)
    first = [_ds(1, 0, 0, ["a", "b"], 100)]
    assert next_dataset_number(first, ["b", "a"], 140) == (1, 1, 0)     # rows added
    assert next_dataset_number(first, ["a", "b"], 100) == (1, 0, 1)     # same count, other rows (corrections)
    assert next_dataset_number(first, ["a", "b"], 90) == (1, 0, 1)      # rows removed
    assert next_dataset_number(first, ["a", "b", "c"], 300) == (2, 0, 0)  # label space changed
    # numbers follow the highest so far, whatever order the rows come in
    assert next_dataset_number([_ds(1, 1, 0, ["a", "b"], 140), *first], ["a", "b"], 150) == (1, 2, 0)


def _run(run_id: str, version: int, dataset: str, rows: int, labels=("a", "b")) -> list:
    envs = successful_run(run_id, progress_steps=0)
    prepared = next(e for e in envs if e.type == "prep.prepared")
    i = envs.index(prepared)
    envs[i] = envelope(PrepPrepared(plan=plan(), manifest=ref(f"m-{dataset}"), train=ref(f"t-{dataset}"), eval=ref("e"),
                                    label_space=list(labels), train_rows=rows, eval_rows=10, test_rows=20,
                                    dataset_version=dataset), run_id=run_id, producer="prep")
    reg = envs[-1]
    envs[-1] = reg.model_copy(update={"payload": {**reg.payload, "version": version}})
    return envs


def _act(payload, run_id="registry-cmd"):
    return envelope(payload, run_id=run_id, producer="registry")


def test_history_follows_each_run_to_promoted_rejected_archived_failed_and_cancelled_with_who_acted():
    t = plan().target
    envs = _run("run-1", 1, "d1", 160) + _run("run-2", 2, "d2", 200) + _run("run-3", 3, "d3", 200, labels=("a", "b", "c"))
    gate = GateDecided(target=t, passed=False, failed=[Notice(reason_code="gate.not_significant", message="p 0.4")],
                       candidate="candidate", baseline="classical:tfidf-logreg", baseline_kind="classical",
                       records=ref("rec"), test_set_sha256="c" * 64, judge_id="rubric:x",
                       evidence={"n": 40, "delta": 0.01, "p_value": 0.4, "candidate_mean": 0.81, "baseline_mean": 0.8})
    envs.insert(envs.index(next(e for e in envs if e.run_id == "run-2" and e.type == "export.completed")),
                envelope(gate, run_id="run-2", producer="evaluator"))
    envs += [
        _act(VersionValidated(target=t, version=1, gate_event_id="g1", actor="registry:gate", reason="gate passed")),
        _act(VersionRejected(target=t, version=2, actor="registry:gate", reason="gate.not_significant: p 0.4")),
        _act(VersionPromoted(target=t, version=1, actor="alice", reason="beats the baseline")),
        _act(VersionPromoted(target=t, version=2, demoted=1, actor="bob", reason="hotfix", override=True)),
        _act(VersionRolledBack(target=t, version=1, demoted=2, actor="carol", reason="errors up")),
        _act(VersionPromoted(target=t, version=3, demoted=1, actor="alice", reason="new labels")),
    ]
    envs += failed_run("run-4")
    cancel_start = successful_run("run-5")[:4]  # started training
    envs += cancel_start + [
        envelope(CancelTraining(requested_by="dave", reason="wrong data"), run_id="run-5", producer="cli"),
        envelope(TrainingFailed(stage="trainer", message="cancelled by dave"), run_id="run-5", producer="trainer",
                 severity=Severity.ERROR, reason_code="training.cancelled"),
    ]
    s = fold(HistoryState(), _rows(envs))
    r = s.runs
    assert {k: (v["status"], v["outcome"]) for k, v in r.items()} == {
        "run-1": ("archived", "promoted"), "run-2": ("archived", "promoted"), "run-3": ("production", "promoted"),
        "run-4": ("failed", "abandoned"), "run-5": ("cancelled", "abandoned")}
    assert r["run-2"]["rejection_reason"] == "gate.not_significant: p 0.4" and r["run-2"]["override"]
    assert (r["run-2"]["delta"], r["run-2"]["p_value"], r["run-2"]["gate_passed"]) == (0.01, 0.4, False)
    assert (r["run-2"]["candidate_judge_mean"], r["run-2"]["baseline_judge_mean"]) == (0.81, 0.8)
    assert r["run-2"]["baseline"] == "classical:tfidf-logreg" and r["run-2"]["gate_failed"] == ["gate.not_significant"]
    assert [(a["type"], a["actor"]) for a in r["run-2"]["acts"] if not a.get("demoted")] == [
        ("registry.rejected", "registry:gate"), ("registry.promoted", "bob")]
    assert [a["actor"] for a in r["run-1"]["acts"]] == ["registry:gate", "alice", "bob", "carol", "alice"]
    assert r["run-1"]["train_rows"] == 160 and r["run-1"]["accuracy"] == 0.9 and r["run-1"]["version"] == 1
    assert r["run-1"]["ended_at"] is not None and r["run-1"]["started_at"] <= r["run-1"]["ended_at"]
    assert [r[k]["dataset_semver"] for k in ("run-1", "run-2", "run-3")] == ["1.0.0", "1.1.0", "2.0.0"]
    assert r["run-4"]["reason_code"] == "ingest.source_not_found"
    assert r["run-5"]["reason_code"] == "training.cancelled" and r["run-5"]["acts"][0]["actor"] == "dave"


def test_a_run_that_stops_after_prep_is_no_fine_tune_but_its_dataset_is_numbered():
    from contracts.commands import StartRun

    p = plan().model_copy(update={"until": "prep"})
    envs = [envelope(StartRun(plan=p), run_id="run-p", producer="cli"),
            envelope(PrepPrepared(plan=p, manifest=ref("m"), train=ref("t"), eval=ref("e"), label_space=["a"],
                                  train_rows=5, eval_rows=1, dataset_version="dp"), run_id="run-p", producer="prep")]
    s = fold(HistoryState(), _rows(envs))
    assert s.runs == {} and s.datasets[p.target]["dp"]["semver"] == "1.0.0"


def test_a_second_registration_of_one_version_takes_it_over_as_the_registry_fold_does():
    # the registry never numbers two runs alike, but anyone may publish on its subjects; History must not stop
    state = fold(HistoryState(), _rows(_run("run-1", 1, "d1", 160) + _run("run-2", 1, "d2", 200)))
    assert state.runs["run-2"]["version"] == 1 and state.runs["run-1"]["version"] is None
    assert state.versions[(plan().target, 1)] == "run-2"
