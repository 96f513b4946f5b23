"""The timeline projection's pure part: stage mapping, summaries and the batch fold.

The database half (the upserts in timeline._UPSERT_RUN / _UPSERT_STAGE) is emulated in a few
lines below so that split-independence — one batch or many give the same rows — can be checked
without PostgreSQL."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import pytest

from contracts.envelope import Envelope, Severity
from contracts.events import MessageDeadLettered, TrainingProgressed
from services.audit.projections.timeline import (
    STAGES,
    ProjectionError,
    fold,
    model_name,
    stage_of,
    stage_status,
    summarize,
)
from tests.factories import envelope, failed_run, successful_run

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def as_rows(envelopes: list[Envelope], start: int = 1) -> list[dict]:
    """run_events rows as the projector reads them: position order, aware datetimes, dict payloads."""
    out = []
    for i, e in enumerate(envelopes):
        d = e.model_dump(mode="json")
        pos = start + i
        out.append({
            "global_position": pos, "event_id": uuid.UUID(d["event_id"]), "type": d["type"], "run_id": d["run_id"],
            "correlation_id": d["correlation_id"], "occurred_at": T0 + timedelta(seconds=pos),
            "severity": d["severity"], "reason_code": d["reason_code"], "payload": d["payload"],
        })
    return out


def renumber(rows: list[dict]) -> list[dict]:
    return [{**r, "global_position": i, "occurred_at": T0 + timedelta(seconds=i)} for i, r in enumerate(rows, 1)]


def dead_letter(run_id: str) -> Envelope:
    return envelope(MessageDeadLettered(consumer="prep-ingest-committed", subject="tuneline.evt.ingest.committed",
                                        stream_sequence=17, deliveries=5, error="boom " * 100,
                                        dlq_subject="tuneline.dlq.prep-ingest-committed"),
                    run_id=run_id, severity=Severity.ERROR, reason_code="bus.delivery_exhausted", producer="prep")


def progress(run_id: str, step: int = 1) -> Envelope:
    return envelope(TrainingProgressed(step=step, max_steps=30, epoch=0.1, loss=0.5, learning_rate=1e-3,
                                       examples_per_s=10.0, eta_s=1.0), run_id=run_id, producer="trainer")


# --- stage_of / stage_status / model_name ----------------------------------------------------


@pytest.mark.parametrize("etype, stage", [
    ("run.start", "run"), ("ingest.committed", "ingest"), ("prep.failed", "prep"),
    ("training.progress", "trainer"), ("eval.completed", "evaluator"), ("export.completed", "export"),
    ("registry.version_registered", "registry"), ("bus.message_dead_lettered", "bus"), ("other.thing", "other"),
])
def test_stage_of_maps_the_type_prefix_to_the_service(etype, stage):
    assert stage_of(etype) == stage


@pytest.mark.parametrize("etype, status", [
    ("ingest.committed", "succeeded"), ("prep.prepared", "succeeded"), ("training.completed", "succeeded"),
    ("eval.completed", "succeeded"), ("export.completed", "succeeded"), ("registry.version_registered", "succeeded"),
    ("training.started", "running"), ("training.progress", "running"),
    ("ingest.failed", "failed"), ("registry.failed", "failed"),
    ("run.start", None), ("bus.message_dead_lettered", None), ("prep.started", None),
])
def test_stage_status_of_each_event(etype, status):
    assert stage_status(etype) == status


@pytest.mark.parametrize("path, name", [
    ("/m/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
    ("/opt/models/all-MiniLM-L6-v2/model", "all-MiniLM-L6-v2"),
    ("/opt/models/all-MiniLM-L6-v2/model/", "all-MiniLM-L6-v2"),
    ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
    ("model", "model"),
    ("/", "/"),
])
def test_model_name_is_the_readable_last_part(path, name):
    assert model_name(path) == name


# --- summarize -------------------------------------------------------------------------------


def test_every_event_of_a_successful_run_gets_a_specific_summary():
    for r in as_rows(successful_run("run-s")):
        line = summarize(r["type"], r["payload"], r["reason_code"])
        assert line and line != r["type"], r["type"]


def test_summaries_carry_the_numbers_of_the_payload():
    rows = {r["type"]: r for r in as_rows(successful_run("run-s", progress_steps=1))}

    def s(t):
        return summarize(t, rows[t]["payload"], rows[t]["reason_code"])

    assert s("run.start") == "run requested: jsonl:/data/sample.jsonl -> target support-intents"
    assert s("ingest.committed") == "read 210 rows: 200 accepted, 10 rejected (ingest.empty_text: 10)"
    assert s("prep.prepared") == "split 160 train / 40 eval over 2 labels, dataset abc"
    assert s("training.started") == "LoRA fine-tune of all-MiniLM-L6-v2 for 30 steps on 160 rows"
    assert s("training.completed") == "trained 30 steps in 9.5s, final loss 0.200"
    assert s("eval.completed") == "candidate accuracy 0.900 macro-F1 0.880 vs base accuracy 0.300 macro-F1 0.200 (n=40)"
    assert s("registry.version_registered") == "registered support-intents v1 as candidate"


def test_ingest_summary_without_rejections_has_no_reason_list():
    p = {"rows_read": 3, "rows_accepted": 3, "rows_rejected": 0, "rejected_by_reason": {}}
    assert summarize("ingest.committed", p, None) == "read 3 rows: 3 accepted, 0 rejected"


def test_failure_summary_names_the_reason_code_and_message():
    _, fail = as_rows(failed_run("run-f"))
    assert summarize(fail["type"], fail["payload"], fail["reason_code"]) == \
        "[ingest.source_not_found] /missing.jsonl does not exist"


def test_dead_letter_summary_is_bounded():
    r = as_rows([dead_letter("run-d")])[0]
    line = summarize(r["type"], r["payload"], r["reason_code"])
    assert line.startswith("[bus.delivery_exhausted] prep-ingest-committed dead-lettered stream seq 17: boom")
    assert len(line) < 300


def test_unknown_event_type_summarizes_as_its_type():
    assert summarize("something.new", {"x": 1}, None) == "something.new"


# --- fold ------------------------------------------------------------------------------------


def test_successful_run_folds_to_succeeded_with_all_six_stages_succeeded():
    rows = as_rows(successful_run("run-ok"))
    b = fold(rows)
    run = b.runs["run-ok"]
    assert run.status == "succeeded"
    assert (run.target, run.locator) == ("support-intents", "jsonl:/data/sample.jsonl")
    assert run.reason_code is None and run.failure is None
    assert (run.started_at, run.updated_at) == (rows[0]["occurred_at"], rows[-1]["occurred_at"])
    assert run.last_position == b.last_position == rows[-1]["global_position"]
    assert {stage: f.status for (_, stage), f in b.stages.items()} == {s: "succeeded" for s in STAGES}
    assert len(b.entries) == len(rows)
    assert [e[0] for e in b.entries] == [r["global_position"] for r in rows]


def test_a_stage_spans_from_its_first_to_its_last_event():
    rows = as_rows(successful_run("run-ok", progress_steps=3))
    trainer = fold(rows).stages[("run-ok", "trainer")]
    first = next(r for r in rows if r["type"] == "training.started")
    last = next(r for r in rows if r["type"] == "training.completed")
    assert (trainer.started_at, trainer.ended_at) == (first["occurred_at"], last["occurred_at"])
    assert (trainer.last_type, trainer.last_position) == ("training.completed", last["global_position"])


def test_a_running_stage_has_no_end():
    rows = as_rows(successful_run("run-ok"))[:5]  # up to the first training.progress
    b = fold(rows)
    assert b.runs["run-ok"].status == "running"
    trainer = b.stages[("run-ok", "trainer")]
    assert (trainer.status, trainer.ended_at) == ("running", None)
    assert ("run-ok", "evaluator") not in b.stages


def test_a_failure_fails_the_run_with_its_reason_code_and_stage():
    b = fold(as_rows(failed_run("run-f")))
    run = b.runs["run-f"]
    assert (run.status, run.reason_code) == ("failed", "ingest.source_not_found")
    assert run.failure == "[ingest.source_not_found] /missing.jsonl does not exist"
    ingest = b.stages[("run-f", "ingest")]
    assert (ingest.status, ingest.reason_code) == ("failed", "ingest.source_not_found")
    assert ingest.ended_at is not None


def test_the_run_stays_failed_with_the_first_reason_after_later_events():
    ok = successful_run("run-x")
    fail = failed_run("run-x")[1]
    dl = dead_letter("run-x")
    rows = renumber(as_rows(ok[:3] + [fail] + ok[3:] + [dl]))
    b = fold(rows)
    run = b.runs["run-x"]
    assert (run.status, run.reason_code) == ("failed", "ingest.source_not_found")
    assert run.failure.startswith("[ingest.source_not_found]")
    assert run.last_position == rows[-1]["global_position"]


def test_a_dead_letter_by_a_stage_consumer_fails_that_stage_and_the_run():
    """The run showed FAILED while the stage whose consumer gave up kept its last row (a trainer that
    died on every delivery showed "trainer running", or no trainer row at all)."""
    rows = renumber(as_rows(successful_run("run-d")[:2] + [dead_letter("run-d")]))
    b = fold(rows)
    run = b.runs["run-d"]
    assert (run.status, run.reason_code) == ("failed", "bus.delivery_exhausted")
    assert run.failure.startswith("[bus.delivery_exhausted] prep-ingest-committed")
    assert {stage for (_, stage) in b.stages} == {"ingest", "prep"}
    prep = b.stages[("run-d", "prep")]
    assert (prep.status, prep.reason_code, prep.last_type) == ("failed", "bus.delivery_exhausted",
                                                               "bus.message_dead_lettered")
    assert prep.ended_at is not None and prep.detail == run.failure
    assert b.entries[-1][4] == "bus"  # the entry itself stays the bus's


def test_a_dead_letter_by_the_recorder_fails_the_run_without_a_stage_row():
    recorder = envelope(MessageDeadLettered(consumer="audit-recorder", subject="tuneline.evt.ingest.committed",
                                            stream_sequence=3, deliveries=1, error="unstorable",
                                            dlq_subject="tuneline.dlq.audit-recorder"),
                        run_id="run-r", severity=Severity.ERROR, reason_code="audit.unstorable_value", producer="audit")
    b = fold(renumber(as_rows(successful_run("run-r")[:2] + [recorder])))
    assert b.runs["run-r"].status == "failed"
    assert {stage for (_, stage) in b.stages} == {"ingest"}


def test_every_stage_consumer_is_named_after_its_stage():
    from services.audit.projections.timeline import consumer_stage
    from services.common.delivery import ConsumerSpec
    from services.evaluator.app import TRAINED
    from services.export.app import EVALUATED
    from services.ingest.app import COMMIT, DRY_RUN, INTROSPECT, START
    from services.prep.app import COMMITTED
    from services.registry.app import EXPORTED
    from services.trainer.app import PREPARED

    for spec in (START, COMMIT, INTROSPECT, DRY_RUN, COMMITTED, PREPARED, TRAINED, EVALUATED, EXPORTED):
        assert consumer_stage(spec.durable) == spec.stage
    with pytest.raises(ValueError, match="must start with"):
        ConsumerSpec(service="trainer", durable="prepared-trainer", subject="x", accepts=(), failure_type=None,
                     stage="trainer")


def test_runs_interleaved_in_one_batch_are_folded_separately():
    ok, bad = successful_run("run-a"), failed_run("run-b")
    rows = renumber(as_rows([ok[0], bad[0], *ok[1:4], bad[1], *ok[4:]]))
    b = fold(rows)
    assert (b.runs["run-a"].status, b.runs["run-b"].status) == ("succeeded", "failed")
    assert b.runs["run-a"].reason_code is None
    assert {stage for (rid, stage) in b.stages if rid == "run-b"} == {"ingest"}


def test_payload_given_as_json_text_folds_like_a_dict():
    rows = as_rows(successful_run("run-j"))
    as_text = [{**r, "payload": json.dumps(r["payload"])} for r in rows]
    assert asdict(fold(as_text)) == asdict(fold(rows))


def test_payload_text_with_an_integer_beyond_64_bits_folds_exactly():
    committed = as_rows(successful_run("run-j"))[1]
    committed["payload"]["rejected_by_reason"] = {"ingest.empty_text": 2**70}
    as_text = {**committed, "payload": json.dumps(committed["payload"])}
    line = f"read 210 rows: 200 accepted, 10 rejected (ingest.empty_text: {2**70})"
    assert fold([as_text]).entries[0][-1] == fold([committed]).entries[0][-1] == line


def test_a_payload_that_breaks_summarize_raises_projection_error_with_its_position():
    rows = as_rows(successful_run("run-e"))
    rows[2] = {**rows[2], "payload": {"unexpected": True}}  # prep.prepared without its fields
    with pytest.raises(ProjectionError) as exc:
        fold(rows)
    assert exc.value.position == rows[2]["global_position"] == 3
    assert "prep.prepared" in str(exc.value) and "position 3" in str(exc.value)
    assert isinstance(exc.value.__cause__, KeyError)


def test_a_payload_that_is_not_json_raises_projection_error_with_its_position():
    rows = as_rows(successful_run("run-e"))
    rows[0] = {**rows[0], "payload": "{not json"}
    with pytest.raises(ProjectionError) as exc:
        fold(rows)
    assert exc.value.position == 1


# --- split-independence ----------------------------------------------------------------------
#
# Emulation of what _apply does in PostgreSQL, kept to the rules of the SQL:
#   timeline_runs:   INSERT status coalesce($5,'running'); ON CONFLICT keep correlation_id and
#                    started_at, target/locator/reason_code/failure first-non-null wins, status
#                    sticky once 'failed', unchanged when the batch has none, 'succeeded' not undone
#                    by a batch that says 'running', else the batch's;
#                    updated_at/last_position from the batch.
#   timeline_stages: ON CONFLICT every column from the batch except started_at.
#   timeline_entries: appended.


def apply(db: dict, b) -> None:
    db["entries"] += b.entries
    for run_id, f in b.runs.items():
        new = asdict(f) | {"status": f.status or "running"}
        t = db["runs"].get(run_id)
        if t is None:
            db["runs"][run_id] = new
            continue
        for col in ("target", "locator", "reason_code", "failure"):
            t[col] = t[col] if t[col] is not None else new[col]
        if t["status"] != "failed" and f.status is not None and not (t["status"] == "succeeded" and f.status == "running"):
            t["status"] = new["status"]
        t["updated_at"], t["last_position"] = f.updated_at, f.last_position
    for key, f in b.stages.items():
        prev = db["stages"].get(key)
        db["stages"][key] = asdict(f) | ({"started_at": prev["started_at"]} if prev else {})


def project(rows: list[dict], cuts: list[int]) -> dict:
    db = {"entries": [], "runs": {}, "stages": {}}
    bounds = [0, *cuts, len(rows)]
    for lo, hi in zip(bounds, bounds[1:]):
        if hi > lo:
            apply(db, fold(rows[lo:hi]))
    return db


def mixed_history() -> list[dict]:
    a, b, c = successful_run("run-a"), failed_run("run-b"), successful_run("run-c")
    late_fail = failed_run("run-c")[1]
    events = [a[0], b[0], c[0], a[1], b[1], c[1], a[2], c[2], dead_letter("run-a"), *a[3:6], late_fail,
              *c[3:], *a[6:], dead_letter("run-b")]
    return renumber(as_rows(events))


def test_one_batch_projects_every_run_to_its_first_failure():
    rows = mixed_history()
    whole = project(rows, [])
    b = fold(rows)
    assert {rid: r["status"] for rid, r in whole["runs"].items()} == {"run-a": "failed", "run-b": "failed",
                                                                     "run-c": "failed"}
    assert whole["runs"]["run-a"]["reason_code"] == "bus.delivery_exhausted"
    assert whole["runs"]["run-c"]["reason_code"] == "ingest.source_not_found"
    assert len(whole["stages"]) == len(b.stages)


@pytest.mark.parametrize("size", range(1, 8))
def test_batches_of_any_fixed_size_give_the_same_rows(size):
    rows = mixed_history()
    cuts = list(range(size, len(rows), size))
    assert project(rows, cuts) == project(rows, [])


def test_random_batch_boundaries_give_the_same_rows():
    rows = mixed_history() + renumber(as_rows(successful_run("run-z")))
    rows = renumber(rows)
    whole = project(rows, [])
    rng = random.Random(99)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(rows)), rng.randint(1, len(rows) - 1)))
        assert project(rows, cuts) == whole, cuts


def test_two_starts_in_one_run_and_a_failure_before_the_start_are_split_independent():
    """The fold kept the last start's target within a batch while the upsert keeps the first across
    batches: one batch and many disagreed (a run started twice, e.g. re-published past the window)."""
    from contracts.commands import StartRun
    from tests.factories import plan

    first = successful_run("run-t")[0]
    again = envelope(StartRun(plan=plan(target="other-target", locator="jsonl:/b.jsonl")), run_id="run-t",
                     producer="cli")
    early_failure = failed_run("run-u")[1]  # ingest.failed before its run.start
    rows = renumber(as_rows([first, again, early_failure, failed_run("run-u")[0], progress("run-t")]))
    whole = project(rows, [])
    assert whole["runs"]["run-t"]["target"] == first.payload["plan"]["target"]
    for size in range(1, len(rows) + 1):
        assert project(rows, list(range(size, len(rows), size))) == whole, size


def test_a_successful_run_gives_the_same_rows_in_any_batching():
    rows = as_rows(successful_run("run-ok"))
    whole = project(rows, [])
    assert whole["runs"]["run-ok"]["status"] == "succeeded"
    for size in range(1, len(rows) + 1):
        assert project(rows, list(range(size, len(rows), size))) == whole


def test_a_late_running_event_after_success_is_split_independent():
    rows = renumber(as_rows(successful_run("run-l") + [progress("run-l", 99)]))
    assert project(rows, [len(rows) - 1]) == project(rows, [])


# --- runs that stop early (plan.until) and one-step ingest questions --------------------------------


def test_a_run_planned_until_prep_succeeds_at_prep_prepared():
    from contracts.commands import CommitIngest
    from contracts.events import IngestCommitted, PrepPrepared
    from tests.factories import plan, ref

    p = plan().model_copy(update={"until": "prep"})
    start = envelope(CommitIngest(plan=p), run_id="r-p", producer="cli")
    committed = envelope(IngestCommitted(plan=p, dataset=ref("d"), rejected=ref("r"), rows_read=3, rows_accepted=3,
                                         rows_rejected=0, rejected_by_reason={}), run_id="r-p", producer="ingest")
    b = fold(as_rows([start, committed]))
    assert b.runs["r-p"].status == "running" and b.runs["r-p"].target == p.target
    prepared = envelope(PrepPrepared(plan=p, manifest=ref("m"), train=ref("t"), eval=ref("e"), label_space=["a"],
                                     train_rows=2, eval_rows=1, dataset_version="v"), run_id="r-p", producer="prep")
    b = fold(as_rows([start, committed, prepared]))
    assert b.runs["r-p"].status == "succeeded"
    assert summarize("ingest.commit", start.payload, None).endswith("(until prep)")


def test_an_introspection_is_a_run_of_one_step_with_its_proposal_in_the_timeline():
    from contracts.commands import IntrospectSource
    from contracts.common import FieldMapping
    from contracts.events import IngestIntrospected, ShapeHypothesis

    ask = envelope(IntrospectSource(locator="csv:/d.csv"), run_id="r-i", producer="cli")
    h = ShapeHypothesis(shape="single_label_classification", confidence=0.62, rationale="r",
                        mapping=FieldMapping(text=["t"], label="l"))
    answer = envelope(IngestIntrospected(locator="csv:/d.csv", source={}, sample_rows=20, fields=["t", "l"],
                                         hypotheses=[h], auto_pick=False), run_id="r-i", producer="ingest")
    b = fold(as_rows([ask, answer]))
    assert b.runs["r-i"].status == "succeeded" and b.runs["r-i"].locator == "csv:/d.csv"
    assert b.entries[-1][-1] == "introspected 20 sample rows: best single_label_classification at 0.62 (below 0.80: not picked)"


def test_a_summary_never_fails_on_a_reason_key_without_a_dot():
    line = summarize("prep.cleaned", {"rows_in": 3, "rows_kept": 1, "dropped_by_reason": {"nodot": 2},
                                      "pii_by_kind": {}, "rows_with_pii": 0}, None)
    assert line == "cleaned 3 rows: kept 1, dropped nodot: 2"


def test_evaluation_and_registry_events_read_as_sentences():
    from contracts.events import (GateDecided, JudgeRef, JudgeValidated, Notice, RolloutSet, VersionPromoted,
                                  VersionRejected, VersionRolledBack)
    from tests.factories import ref

    judge = JudgeValidated(judge=JudgeRef(judge_id="rubric:abc", kind="rubric"), test_set_sha256="a" * 64, n_gold=10,
                           n_wrong=10, accuracy=1.0, cohen_kappa=1.0, gold_mean=1.0, wrong_mean=0.0,
                           min_agreement=0.8, passed=True)
    gate = GateDecided(target="t", passed=False, failed=[Notice(reason_code="gate.not_significant", message="p")],
                       candidate="candidate", baseline="classical:tfidf-logreg", baseline_kind="classical",
                       records=ref("r"), test_set_sha256="a" * 64, judge_id="rubric:abc",
                       evidence={"candidate_mean": 0.81, "baseline_mean": 0.78, "delta": 0.03, "p_value": 0.2, "n": 200})
    lines = {type(p).__name__: summarize(t, p.model_dump(mode="json"), None) for t, p in [
        ("judge.validated", judge), ("eval.gate_decided", gate),
        ("registry.promoted", VersionPromoted(target="t", actor="maria", reason="beats prod", version=3, demoted=1)),
        ("registry.rejected", VersionRejected(target="t", actor="registry", reason="gate failed", version=4,
                                              failed=[Notice(reason_code="gate.delta_below_margin", message="m")])),
        ("registry.rolled_back", VersionRolledBack(target="t", actor="op", reason="latency", version=1, demoted=3)),
        ("registry.rollout_set", RolloutSet(target="t", actor="op", reason="stage", version=3, percent=25,
                                            previous_percent=100))]}
    assert lines["JudgeValidated"] == "judge rubric:abc validated: agreement 1.000, kappa 1.000 on 10 gold / 10 wrong"
    assert lines["GateDecided"] == ("gate failed: gate.not_significant (judge mean 0.810 vs classical:tfidf-logreg "
                                    "0.780, delta 0.030, p=0.200, n=200)")
    assert lines["VersionPromoted"] == "t v3 promoted to production (v1 archived) by maria: beats prod"
    assert lines["VersionRejected"] == "t v4 rejected: gate.delta_below_margin"
    assert lines["VersionRolledBack"] == "t rolled back to v1 (v3 archived): latency"
    assert lines["RolloutSet"] == "t v3 rollout 100% -> 25%"
