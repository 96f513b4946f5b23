"""Hand-checked cases for the evaluator's accuracy and F1 metrics."""

from __future__ import annotations

import pytest

from services.evaluator.domain import (
    ClassificationScores,
    accuracy,
    macro_f1,
    per_class_f1,
    score_classification,
)

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


def test_score_classification_bundles_everything():
    scores = score_classification(["a", "b", "b", "c"], ["a", "b", "c", "c"], SPACE)
    assert isinstance(scores, ClassificationScores)
    assert scores.n == 4
    assert scores.accuracy == 0.75
    # a: 1; b: tp=1 fn=1 -> 2/3; c: tp=1 fp=1 -> 2/3
    assert scores.per_class_f1 == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 2 / 3})
    assert scores.macro_f1 == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert scores.as_dict()["n"] == 4


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="differ in length"):
        macro_f1(["a"], ["a", "b"], SPACE)


def test_empty_inputs_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="empty"):
        score_classification([], [], SPACE)


def test_true_label_outside_space_is_rejected():
    with pytest.raises(ValueError, match="outside label_space"):
        macro_f1(["a", "d"], ["a", "a"], SPACE)
