"""Hand-checked cases for the classification metrics (services/common/metrics.py, scikit-learn)."""

from __future__ import annotations

import pytest

from services.common.metrics import (
    accuracy,
    classification_report,
    macro_f1,
    severity_calibration,
    tag_report,
    triage_report,
)


def per_class_f1(y_true, y_pred, space):
    return {k: v["f1"] for k, v in classification_report(y_true, y_pred, space)["per_class"].items()}

SPACE = ["a", "b", "c"]


def test_perfect_predictions_score_one():
    y = ["a", "b", "c", "a"]
    assert accuracy(y, y) == 1.0
    assert macro_f1(y, y, SPACE) == 1.0


def test_all_wrong_predictions_score_zero():
    y_true = ["a", "b", "c"]
    y_pred = ["b", "c", "a"]
    assert accuracy(y_true, y_pred) == 0.0
    assert macro_f1(y_true, y_pred, SPACE) == 0.0


def test_class_never_predicted():
    # a: tp=2 fp=1 fn=0 -> 4/5; b: tp=1 fp=0 fn=0 -> 1; c: tp=0 fp=0 fn=1 -> 0
    y_true = ["a", "a", "b", "c"]
    y_pred = ["a", "a", "b", "a"]
    assert accuracy(y_true, y_pred) == 0.75
    assert per_class_f1(y_true, y_pred, SPACE) == pytest.approx({"a": 0.8, "b": 1.0, "c": 0.0})
    assert macro_f1(y_true, y_pred, SPACE) == pytest.approx((0.8 + 1.0 + 0.0) / 3)


def test_label_absent_from_both_sides_counts_as_zero():
    y = ["a", "b"]
    assert per_class_f1(y, y, SPACE)["c"] == 0.0
    assert macro_f1(y, y, SPACE) == pytest.approx(2 / 3)


def test_prediction_outside_label_space_is_just_wrong():
    # a: tp=1 fn=1 -> 2/3; b: tp=1 -> 1
    assert macro_f1(["a", "a", "b"], ["a", "zzz", "b"], ["a", "b"]) == pytest.approx((2 / 3 + 1) / 2)


def test_classification_report_bundles_everything():
    r = classification_report(["a", "b", "b", "c"], ["a", "b", "c", "c"], SPACE)
    assert r["n"] == 4
    assert r["accuracy"] == 0.75
    # a: 1; b: tp=1 fn=1 -> 2/3; c: tp=1 fp=1 -> 2/3
    assert {k: v["f1"] for k, v in r["per_class"].items()} == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 2 / 3})
    assert r["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert r["micro_f1"] == pytest.approx(0.75)
    assert r["per_class"]["b"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert r["confusion"]["matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_unparseable_answers_are_wrong_and_counted_in_their_own_column():
    r = classification_report(["a", "b", "b"], ["a", None, "b"], ["a", "b"])
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["unparseable"] == 1
    assert r["confusion"]["unparseable"] == [0, 1]
    assert r["per_class"]["b"]["recall"] == 0.5


def test_tag_report_micro_and_macro():
    r = tag_report([["x", "y"], ["y"], []], [["x"], ["y", "z"], None], ["x", "y", "z"])
    # x: tp1; y: tp1 fn1; z: fp1 -> micro 2*2/(2*2+1+1) = 2/3
    assert r["micro_f1"] == pytest.approx(2 / 3)
    assert r["per_tag_f1"] == pytest.approx({"x": 1.0, "y": 2 / 3, "z": 0.0})
    assert r["unparseable"] == 1
    assert r["exact_set_accuracy"] == pytest.approx(1 / 3)


def test_severity_calibration_distribution_drift_and_ordinal_error():
    truth = ["Major", "Major", "Minor", "Blocker"]
    always_major = ["Major"] * 4
    c = severity_calibration(truth, always_major)
    assert c["distribution_tvd"] == pytest.approx(0.5)
    assert c["order"][0] == "Blocker"
    # Major->Major 0, 0; Minor->Major 1; Blocker->Major 2
    assert c["mean_ordinal_error"] == pytest.approx(3 / 4)
    assert severity_calibration(truth, truth)["distribution_tvd"] == 0.0


def test_triage_report_scores_each_field_on_its_own_rows():
    gold = [{"label": "bug", "severity": "Major", "component": "ui"},
            {"label": "bug", "severity": "Minor", "component": None},
            {"label": "feature", "severity": "Major", "component": "api"}]
    out = [{"label": "bug", "severity": "Major", "component": "api"}, None,
           {"label": "feature", "severity": "Minor", "component": "api"}]
    r = triage_report(gold, out, {}, severity_field="severity")
    assert r["label"]["accuracy"] == pytest.approx(2 / 3)
    assert r["component"]["n"] == 2  # the row without a component is not scored on it
    assert r["component"]["accuracy"] == pytest.approx(0.5)
    assert "calibration" in r["severity"] and "calibration" not in r["label"]


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="differ in length"):
        macro_f1(["a"], ["a", "b"], SPACE)


def test_empty_inputs_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [], SPACE)


def test_true_label_outside_space_is_rejected():
    with pytest.raises(ValueError, match="outside label_space"):
        macro_f1(["a", "d"], ["a", "a"], SPACE)
