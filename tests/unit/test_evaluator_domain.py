"""The evaluator's pure layer: per-row records and the rubric judge, the judge's validation, the
classical baseline, model reports and the warnings an evaluation carries."""

from __future__ import annotations

import json
import random

import pytest

from services.evaluator import domain
from services.evaluator.adapters.classical import choose_c, score_classical
from services.evaluator.scoring import Scored, field_scores, row_id, rubric_score

SPACE = ["bug", "feature", "question"]


def _rows(n=30):
    return [{"row_id": f"r{i}", "text": f"text {i}", "label": SPACE[i % 3], "heads": {"project": "A" if i < n // 2 else "B"}}
            for i in range(n)]


def _scored(model, outputs):
    return Scored(model=model, outputs=outputs, latency_ms=[2.0] * len(outputs), compute_s=0.36)


def test_records_pair_each_row_with_both_models_and_score_by_the_rubric():
    rows = _rows()
    cand = _scored("candidate", [r["label"] for r in rows])
    base = _scored("classical:tfidf-logreg", [r["label"] if i % 2 else "bug" for i, r in enumerate(rows)])
    j = domain.judge_rows(rows, cand, base, kind="single_label", weights={}, bucket_fields=["project"])
    assert len(j.records) == 2 * len(rows)
    assert j.candidate_scores == [1.0] * len(rows)
    assert j.baseline_scores == [1.0 if (i % 2 or r["label"] == "bug") else 0.0 for i, r in enumerate(rows)]
    assert j.row_ids == [r["row_id"] for r in rows]
    assert j.buckets[0] == {"class": "bug", "project": "A"} and j.buckets[-1]["project"] == "B"
    rec = j.records[len(rows) + 2]  # row 2 is a question the baseline calls a bug
    assert rec["model"] == "classical:tfidf-logreg" and rec["output"] == "bug" and rec["correct"] == {"label": 0.0}
    json.dumps(j.records)  # the artifact is JSONL


def test_a_row_answered_by_one_model_only_is_refused():
    rows = _rows(6)
    with pytest.raises(ValueError, match="answered 5 of 6"):
        domain.judge_rows(rows, _scored("candidate", ["bug"] * 6), _scored("b", ["bug"] * 5), kind="single_label",
                          weights={}, bucket_fields=[])


def test_rubric_weights_fields_of_a_triage_row():
    gold = {"label": "bug", "severity": "Major", "tags": ["ui", "crash"]}
    out = {"label": "bug", "severity": "Minor", "tags": ["ui"]}
    s = field_scores(gold, out, "triage")
    assert s == {"label": 1.0, "severity": 0.0, "tags": 0.5}
    assert rubric_score(s, {"label": 2, "severity": 1, "tags": 1}) == pytest.approx((2 + 0 + 0.5) / 4)
    with pytest.raises(ValueError, match="no weight"):
        rubric_score(s, {"label": 0, "severity": 0, "tags": 0})
    assert field_scores(gold, None, "triage") == {"label": 0.0, "severity": 0.0, "tags": 0.0}


def test_row_id_is_prep_s_when_given_else_a_content_hash():
    assert row_id({"row_id": "abc", "text": "x"}) == "abc"
    assert row_id({"text": "x"}) == row_id({"text": "x", "label": "other"}) != row_id({"text": "y"})


def test_the_rubric_judge_validates_against_gold_and_wrong_answers():
    v = domain.validate_rubric(_rows(), kind="single_label", weights={}, label_space=SPACE, min_agreement=0.8)
    assert v["passed"] and v["accuracy"] == 1.0 and v["cohen_kappa"] == 1.0
    assert v["gold_mean"] == 1.0 and v["wrong_mean"] == 0.0


def test_a_judge_that_cannot_tell_gold_from_wrong_fails_validation():
    rng = random.Random(3)
    noisy = domain.judge_agreement([rng.random() for _ in range(50)], [rng.random() for _ in range(50)], 0.8)
    assert not noisy["passed"] and noisy["accuracy"] < 0.8 and abs(noisy["cohen_kappa"]) < 0.4
    constant = domain.judge_agreement([0.7] * 10, [0.7] * 10, 0.8)
    assert not constant["passed"] and constant["cohen_kappa"] == 0.0


def _topic_rows(n, seed):
    words = {"bug": ["crash", "error", "broken", "fails"], "feature": ["add", "support", "would", "request"],
             "question": ["how", "why", "what", "help"]}
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = SPACE[i % 3]
        text = " ".join(rng.choice(words[label]) for _ in range(3)) + " " + " ".join(
            rng.choice(["the", "app", "page", "today", "please"]) for _ in range(4))
        rows.append({"row_id": f"{seed}-{i}", "text": text, "label": label})
    return rows


def test_the_classical_baseline_learns_from_train_and_picks_c_on_validation_only():
    train, val = _topic_rows(90, 1), _topic_rows(30, 2)
    test_a, test_b = _topic_rows(30, 3), [dict(r, label="bug") for r in _topic_rows(30, 4)]
    scored, info = score_classical(train, val, test_a, SPACE)
    acc = sum(o == r["label"] for o, r in zip(scored.outputs, test_a)) / len(test_a)
    assert acc > 0.9  # the words give the label away: a working baseline finds them
    assert scored.model == "classical:tfidf-logreg" and len(scored.latency_ms) == len(test_a)
    # the test rows never choose the setting: other test rows, the same C
    assert score_classical(train, val, test_b, SPACE)[1]["C"] == info["C"]
    assert choose_c(train, [], SPACE) == (1.0, {})


def test_the_classical_baseline_refuses_a_train_split_it_cannot_learn_from():
    with pytest.raises(ValueError, match="needs train rows"):
        score_classical([], [], _topic_rows(3, 1), SPACE)
    with pytest.raises(ValueError, match="two labels"):
        score_classical([dict(r, label="bug") for r in _topic_rows(9, 1)], [], _topic_rows(3, 1), SPACE)


def test_multi_label_baseline_answers_tag_lists():
    rows = [{"text": t, "tags": tags} for t, tags in [("crash ui", ["ui", "crash"]), ("slow api", ["perf", "api"]),
                                                     ("ui glitch", ["ui"]), ("api timeout", ["api"])] * 6]
    scored, _ = score_classical(rows, [], rows[:4], ["api", "crash", "perf", "ui"], multi_label=True)
    assert all(isinstance(o, list) for o in scored.outputs)
    assert "ui" in scored.outputs[0]


def test_model_report_prices_local_compute_and_takes_latency_percentiles():
    rows = _rows(4)
    s = Scored(model="candidate", outputs=["bug", "feature", "question", "bug"], latency_ms=[1, 2, 3, 100],
               compute_s=36.0)
    r = domain.model_report(rows, s, [1, 1, 1, 1], kind="single_label", label_space=SPACE, usd_per_hour=2.0)
    assert r.latency_ms_p50 == 2 and r.latency_ms_p95 == 100
    assert r.usd_per_1k == pytest.approx(36 / 3600 * 2.0 / 4 * 1000)
    assert r.metrics["accuracy"] == 1.0 and r.judge_mean == 1.0
    hosted = Scored(model="prompt:m", outputs=["bug"] * 4, latency_ms=[5] * 4, tokens=[10, 20, 30, 40], usd=0.002)
    r2 = domain.model_report(rows, hosted, [1, 0, 0, 1], kind="single_label", label_space=SPACE, usd_per_hour=2.0)
    assert r2.usd_per_1k == pytest.approx(0.5) and r2.tokens_median == 25


def test_a_model_answering_one_class_is_flagged_degenerate():
    rows = _rows(40)
    w = domain.evaluation_warnings(rows, _scored("candidate", ["bug"] * 40), kind="single_label", label_space=SPACE)
    assert [x.reason_code for x in w] == ["eval.degenerate_model"]
    ok = domain.evaluation_warnings(rows, _scored("candidate", [r["label"] for r in rows]), kind="single_label",
                                    label_space=SPACE)
    assert ok == []


def test_labels_without_test_rows_and_unparseable_answers_are_named():
    rows = [r for r in _rows(30) if r["label"] != "question"]
    out = [r["label"] for r in rows]
    out[0] = None
    codes = [x.reason_code for x in domain.evaluation_warnings(rows, _scored("c", out), kind="single_label",
                                                               label_space=SPACE)]
    assert codes == ["eval.class_missing_from_test", "eval.unparseable_output"]


def test_kind_of_each_candidate():
    assert domain.kind_of("sequence_classification", "single_label_classification") == "single_label"
    assert domain.kind_of("multi_label_classification", "multi_field_triage") == "multi_label"
    assert domain.kind_of("chat_sft", "json_extraction") == "json"
    assert domain.kind_of("chat_sft", "multi_field_triage") == "triage"
    assert domain.kind_of("sequence_classification", "multi_field_triage") == "single_label"
    assert domain.kind_of(None, "chat_messages") == "text"
    with pytest.raises(ValueError, match="no scorer"):
        domain.kind_of("chat_sft", "preference_pairs")
