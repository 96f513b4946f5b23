"""Classification metrics, from scikit-learn: what the trainer selects checkpoints by and what the
evaluator reports (accuracy, per-class precision / recall / F1, micro- and macro-F1, the confusion
matrix; per-field scores and severity calibration for triage rows; tag F1 for multi-label rows).

Macro-F1 is averaged over the declared label space, so two models scored on one split are comparable
even when a class has no true and no predicted row (it scores 0, as scikit-learn's zero_division=0).
Imports scikit-learn inside the functions: services that never score start without it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

# Severity scales whose order is known (most severe first): the ordinal error needs an order.
SEVERITY_ORDERS = (
    ("Blocker", "Critical", "Major", "Minor", "Trivial"),
    ("critical", "high", "medium", "low"),
    ("P0", "P1", "P2", "P3", "P4"),
    ("urgent", "high", "normal", "low"),
)


def _check(y_true: Sequence, y_pred: Sequence) -> None:
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


def _as_pred(y_pred: Sequence) -> list[str]:
    # an unparseable answer (None) is a wrong answer, under a name no label can have
    return ["\x00none" if p is None else str(p) for p in y_pred]


def accuracy(y_true: Sequence[str], y_pred: Sequence[str | None]) -> float:
    _check(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str | None], label_space: Sequence[str]) -> float:
    from sklearn.metrics import f1_score

    _check(y_true, y_pred)
    _check_label_space(y_true, label_space)
    return float(f1_score(list(y_true), _as_pred(y_pred), labels=list(label_space), average="macro", zero_division=0))


def classification_report(y_true: Sequence[str], y_pred: Sequence[str | None], label_space: Sequence[str]) -> dict[str, Any]:
    """Accuracy, micro- and macro-F1, per-class precision / recall / F1 / support, and the confusion
    matrix (rows: true label, columns: predicted, both in label-space order; unparseable answers in a
    last column)."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    _check(y_true, y_pred)
    _check_label_space(y_true, label_space)
    labels, pred = list(label_space), _as_pred(y_pred)
    p, r, f, s = precision_recall_fscore_support(list(y_true), pred, labels=labels, zero_division=0)
    unparseable = sum(v is None for v in y_pred)
    cm = confusion_matrix(list(y_true), pred, labels=labels + ["\x00none"])[: len(labels)]
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": float(f1_score(list(y_true), pred, labels=labels, average="macro", zero_division=0)),
        # micro over the label space: an unparseable answer is a false negative of its true class
        "micro_f1": float(f1_score(list(y_true), pred, labels=labels, average="micro", zero_division=0)),
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, lab in enumerate(labels)},
        "confusion": {"labels": labels, "matrix": [[int(x) for x in row[: len(labels)]] for row in cm],
                      "unparseable": [int(row[-1]) for row in cm]},
        "unparseable": unparseable,
        "n": len(y_true),
    }


def tag_report(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str] | None], tag_space: Sequence[str]) -> dict[str, Any]:
    """Multi-label tags: micro- and macro-F1 over the tag space, per-tag F1, exact-set accuracy."""
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    _check(y_true, y_pred)
    space = list(tag_space)
    mlb = MultiLabelBinarizer(classes=space)
    t = mlb.fit_transform([[x for x in row if x in space] for row in y_true])
    pred = [[x for x in (row or []) if x in space] for row in y_pred]
    p = mlb.transform(pred)
    per_tag = f1_score(t, p, average=None, zero_division=0) if space else []
    return {
        "micro_f1": float(f1_score(t, p, average="micro", zero_division=0)) if space else 0.0,
        "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)) if space else 0.0,
        "per_tag_f1": {tag: float(per_tag[i]) for i, tag in enumerate(space)},
        "exact_set_accuracy": sum(set(a) == set(b or []) for a, b in zip(y_true, y_pred)) / len(y_true),
        "unparseable": sum(v is None for v in y_pred),
        "n": len(y_true),
    }


def severity_order(values: Sequence[str]) -> list[str] | None:
    """The known order (most severe first) that holds every value, or None."""
    present = set(values)
    for order in SEVERITY_ORDERS:
        if present <= set(order):
            return list(order)
    return None


def severity_calibration(y_true: Sequence[str], y_pred: Sequence[str | None], order: Sequence[str] | None = None) -> dict[str, Any]:
    """How far the predicted severity distribution drifts from the true one (total variation distance,
    0 = the same shares, 1 = disjoint) and, when the scale has a known order, the mean ordinal error
    (|predicted rank - true rank|; an unparseable answer counts as the largest possible error)."""
    _check(y_true, y_pred)
    n = len(y_true)
    t, p = Counter(y_true), Counter(y_pred)
    values = set(t) | set(p)
    tvd = 0.5 * sum(abs(t[v] / n - p[v] / n) for v in values)
    out: dict[str, Any] = {"distribution_tvd": tvd,
                           "true_share": {str(k): v / n for k, v in sorted(t.items(), key=lambda kv: str(kv[0]))},
                           "predicted_share": {str(k): v / n for k, v in sorted(p.items(), key=lambda kv: str(kv[0]))}}
    order = list(order) if order else severity_order([v for v in y_true if v is not None])
    if order:
        rank = {v: i for i, v in enumerate(order)}
        worst = len(order) - 1
        errs = [abs(rank[a] - rank[b]) if b in rank else worst for a, b in zip(y_true, y_pred)]
        out["order"] = order
        out["mean_ordinal_error"] = sum(errs) / n
    return out


def triage_report(gold: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any] | None],
                  spaces: Mapping[str, Sequence[str]], severity_field: str | None = None) -> dict[str, Any]:
    """Per field of triage rows: a classification report for each single-valued field (over its rows
    with a value), tag F1 for each list-valued field, and severity calibration for `severity_field`."""
    _check(gold, outputs)
    out: dict[str, Any] = {}
    fields = sorted({k for g in gold for k in g})
    for name in fields:
        rows = [(g[name], (o or {}).get(name) if isinstance(o, Mapping) else None)
                for g, o in zip(gold, outputs) if g.get(name) is not None]
        if not rows:
            continue
        t, p = [r[0] for r in rows], [r[1] for r in rows]
        if isinstance(t[0], list):
            out[name] = tag_report(t, [x if isinstance(x, list) else None for x in p], spaces.get(name) or sorted({x for r in t for x in r}))
        else:
            space = list(spaces.get(name) or sorted({str(x) for x in t}))
            space += sorted({str(x) for x in t} - set(space))
            out[name] = classification_report([str(x) for x in t], [None if x is None else str(x) for x in p], space)
            if name == severity_field:
                out[name]["calibration"] = severity_calibration([str(x) for x in t], [None if x is None else str(x) for x in p])
    return out
