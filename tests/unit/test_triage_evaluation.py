"""The evaluator on triage rows answered by the multi-head model: scored per field (records, the rubric's
per-field weights, per-field metrics with severity calibration), against a classical baseline of one
TF-IDF + logistic regression per field."""

from __future__ import annotations

import random

import pytest

from contracts.common import EvaluationSettings, JudgeSettings
from services.evaluator import domain
from services.evaluator.adapters.classical import TRIAGE_NAME, score_classical_triage
from services.evaluator.scoring import Scored, field_scores

PROJECTS = {"HIVE": ["query", "table", "join"], "HDFS": ["block", "datanode", "replica"],
            "AMQ": ["broker", "queue", "topic"]}
SEVERITY = {"Blocker": ["crash", "hang"], "Major": ["wrong", "fails"], "Minor": ["typo", "cosmetic"]}
COMPONENT = {"docs": "documentation", "build": "maven", None: None}


def triage_rows(n: int, seed: int) -> list[dict]:
    """Each field is given away by a word of its own; a third of the rows have no component."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        project, severity, component = (rng.choice(sorted(PROJECTS)), rng.choice(sorted(SEVERITY)),
                                        rng.choice(["docs", "build", None]))
        words = [rng.choice(PROJECTS[project]), rng.choice(SEVERITY[severity]),
                 *([COMPONENT[component]] if component else []), *rng.sample(["the", "when", "after", "on", "a"], 3)]
        rng.shuffle(words)
        tags = ["newbie"] if "typo" in words else []
        rows.append({"row_id": f"{seed}-{i}", "text": " ".join(words), "label": project,
                     "heads": {"severity": severity, "component": component}, "tags": tags})
    return rows


def gold(row: dict) -> dict:
    return {"label": row["label"], **row["heads"], "tags": row["tags"]}


def _scored(model: str, outputs: list) -> Scored:
    return Scored(model=model, outputs=outputs, latency_ms=[1.0] * len(outputs), compute_s=0.1)


def test_the_triage_model_is_scored_as_triage_whatever_the_shape_says():
    assert domain.kind_of("multi_field_triage", "multi_field_triage") == "triage"
    assert domain.kind_of("multi_field_triage", None) == "triage"
    assert domain.kind_of("sequence_classification", "multi_field_triage") == "single_label"


def test_the_severity_field_is_a_head_named_so_or_a_lead_label_on_a_severity_scale():
    rows = triage_rows(10, 1)
    assert domain.severity_field(rows, "triage") == "severity"
    priority = [dict(r, heads={"Priority": r["heads"]["severity"]}) for r in rows]
    assert domain.severity_field(priority, "triage") == "Priority"
    lead = [{"label": r["heads"]["severity"], "heads": {"project": r["label"]}} for r in rows]
    assert domain.severity_field(lead, "triage") == "label"
    assert domain.severity_field([{"label": r["label"], "heads": {"component": "x"}} for r in rows], "triage") is None
    assert domain.severity_field(rows, "single_label") is None


def test_a_field_without_a_gold_value_is_not_judged():
    scores = field_scores({"label": "HIVE", "severity": "Major", "component": None, "tags": []},
                          {"label": "HIVE", "severity": "Minor", "component": "docs", "tags": []}, "triage")
    assert scores == {"label": 1.0, "severity": 0.0, "tags": 1.0}


def test_the_classical_baseline_trains_one_model_per_field():
    train, val, test = triage_rows(240, 1), triage_rows(60, 2), triage_rows(60, 3)
    scored, info = score_classical_triage(train, val, test)
    assert scored.model == TRIAGE_NAME and len(scored.outputs) == len(test)
    assert set(info["fields"]) == {"label", "severity", "component", "tags"}
    assert info["fields"]["component"]["train_rows"] == sum(r["heads"]["component"] is not None for r in train)
    for field in ("label", "severity", "component"):
        pairs = [(gold(r)[field], o[field]) for r, o in zip(test, scored.outputs) if gold(r)[field] is not None]
        assert sum(g == p for g, p in pairs) / len(pairs) >= 0.9, field
    assert all(isinstance(o["tags"], list) for o in scored.outputs)
    with pytest.raises(ValueError, match="two labels"):
        score_classical_triage([dict(r, label="HIVE") for r in train], val, test)


def test_triage_rows_are_judged_and_reported_per_field():
    train, val, test = triage_rows(240, 1), triage_rows(60, 2), triage_rows(80, 3)
    baseline, _ = score_classical_triage(train, val, test)
    # the candidate: every field right but the severity of every other row, and always a component
    answers = [{**gold(r), "component": r["heads"]["component"] or "docs",
                "severity": r["heads"]["severity"] if i % 2 else "Minor"} for i, r in enumerate(test)]
    settings = EvaluationSettings(judge=JudgeSettings(weights={"label": 2, "severity": 1, "component": 1, "tags": 0}))
    a = domain.assess(test, _scored("candidate", answers), baseline, kind="triage", label_space=sorted(PROJECTS),
                      settings=settings, severity_field=domain.severity_field(test, "triage"))
    rec = next(r for r in a.judged.records if r["model"] == "candidate" and r["row_id"] == test[0]["row_id"])
    assert set(rec["correct"]) == {"label", "severity", "tags"} | ({"component"} if test[0]["heads"]["component"] else set())
    # the rubric weighs each field as the plan says (tags weigh 0 here); a row without a component is judged without it
    for r, score in zip(test, a.judged.candidate_scores):
        severity_right = answers[test.index(r)]["severity"] == r["heads"]["severity"]
        has_component = r["heads"]["component"] is not None
        assert score == pytest.approx((2 + severity_right + has_component) / (3 + has_component))
    fields = a.candidate_report.metrics["fields"]
    assert set(fields) == {"label", "severity", "component", "tags"}
    assert fields["label"]["accuracy"] == 1.0 and fields["tags"]["micro_f1"] == 1.0
    assert fields["component"]["n"] == sum(r["heads"]["component"] is not None for r in test)
    calibration = fields["severity"]["calibration"]
    assert calibration["order"][:2] == ["Blocker", "Critical"] and calibration["mean_ordinal_error"] > 0
    assert "calibration" not in fields["label"]
    assert a.validation["passed"]  # the rubric tells gold from wrong answers on these rows
    assert a.baseline_report.metrics["fields"]["label"]["accuracy"] >= 0.9


def test_a_label_model_scored_on_triage_rows_answers_the_lead_field():
    pytest.importorskip("faststream")
    from services.evaluator.app import _as_kind

    assert _as_kind(["HIVE", None], "triage") == [{"label": "HIVE"}, None]
    assert _as_kind([{"label": "HIVE", "tags": ["x"]}], "single_label") == ["HIVE"]
    assert _as_kind([{"label": "HIVE", "tags": ["x"]}], "multi_label") == [["x"]]
    assert _as_kind([["x"]], "multi_label") == [["x"]]
