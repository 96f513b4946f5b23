"""Pure classification metrics (accuracy, per-class and macro F1) for comparing a tuned model with its base."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def _check(y_true: Sequence[str], y_pred: Sequence[str]) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} != {len(y_pred)}")
    if not y_true:
        raise ValueError("cannot score an empty set of predictions")


def _check_label_space(y_true: Sequence[str], label_space: Sequence[str]) -> None:
    if not label_space:
        raise ValueError("label_space is empty")
    if len(set(label_space)) != len(label_space):
        raise ValueError(f"label_space has duplicates: {list(label_space)}")
    # a true label outside the space is a data bug; a predicted one is just a wrong answer
    unknown = sorted(set(y_true) - set(label_space))
    if unknown:
        raise ValueError(f"y_true has labels outside label_space: {unknown[:10]}")


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    _check(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def per_class_f1(y_true: Sequence[str], y_pred: Sequence[str], label_space: Sequence[str]) -> dict[str, float]:
    """F1 per label; any 0/0 (precision, recall or F1) counts as 0, as scikit-learn's zero_division=0.

    Consequence worth knowing: a label with no true and no predicted rows scores 0 and
    pulls the macro average down. We keep it so that macro-F1 is always averaged over the
    same declared label_space, which makes scores of two models on one split comparable.
    """
    _check(y_true, y_pred)
    _check_label_space(y_true, label_space)
    scores: dict[str, float] = {}
    for label in label_space:
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred))
        fp = sum(t != label and p == label for t, p in zip(y_true, y_pred))
        fn = sum(t == label and p != label for t, p in zip(y_true, y_pred))
        denominator = 2 * tp + fp + fn
        # 2tp / (2tp + fp + fn) is F1 without going through precision and recall
        scores[label] = 2 * tp / denominator if denominator else 0.0
    return scores


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], label_space: Sequence[str]) -> float:
    scores = per_class_f1(y_true, y_pred, label_space)
    return sum(scores.values()) / len(scores)


@dataclass(frozen=True)
class ClassificationScores:
    accuracy: float
    macro_f1: float
    per_class_f1: Mapping[str, float]
    n: int

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class_f1": dict(self.per_class_f1),
            "n": self.n,
        }


def score_classification(
    y_true: Sequence[str], y_pred: Sequence[str], label_space: Sequence[str]
) -> ClassificationScores:
    per_class = per_class_f1(y_true, y_pred, label_space)
    return ClassificationScores(
        accuracy=accuracy(y_true, y_pred),
        macro_f1=sum(per_class.values()) / len(per_class),
        per_class_f1=per_class,
        n=len(y_true),
    )
