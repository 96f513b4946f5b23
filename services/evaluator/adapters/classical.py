"""The classical baseline (D15): TF-IDF + logistic regression (scikit-learn), trained in the evaluator
on the candidate's own train split: the cheaper path a fine-tune has to beat on the same test rows.

Its one setting, the regularisation strength C, is chosen on the validation split (never on the test
rows that judge it); without a validation split it keeps scikit-learn's default. Class weights are
balanced: with a skewed label (JIRA priority: Major ~68%) an unweighted model predicts the majority
and would be a baseline that can hardly lose on accuracy and hardly win on macro-F1.

Triage rows (`score_classical_triage`) get one such model per field: the lead label and each head
trained on the rows that have a value for it (the first, when a row has several), the tags as one
sigmoid-style one-vs-rest model; each field's C chosen on its own validation rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.evaluator.scoring import Scored

NAME = "classical:tfidf-logreg"
C_GRID = (0.25, 1.0, 4.0, 16.0)


def _pipeline(c: float, multi_label: bool, seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline

    lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)
    return make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=200_000),
        OneVsRestClassifier(lr) if multi_label else lr,
    )


def _targets(rows: Sequence[dict], multi_label: bool, label_space: Sequence[str]):
    if not multi_label:
        return [r["label"] for r in rows]
    from sklearn.preprocessing import MultiLabelBinarizer

    return MultiLabelBinarizer(classes=list(label_space)).fit_transform(
        [[t for t in (r.get("tags") or []) if t in label_space] for r in rows])


def _fit(rows, label_space, c, multi_label, seed):
    import warnings

    model = _pipeline(c, multi_label, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tag no train row has: OneVsRest warns and predicts it never
        model.fit([r["text"] for r in rows], _targets(rows, multi_label, label_space))
    return model


def _predict(model, texts: Sequence[str], multi_label: bool, label_space: Sequence[str]) -> list:
    out = model.predict(list(texts))
    if multi_label:
        out = out.reshape(len(texts), -1)  # one tag: OneVsRest predicts a flat column
        return [[label_space[j] for j, on in enumerate(row) if on] for row in out]
    return [str(x) for x in out]


def choose_c(train: Sequence[dict], validation: Sequence[dict], label_space: Sequence[str], *,
             multi_label: bool = False, seed: int = 13) -> tuple[float, dict[float, float]]:
    """The C with the best validation macro-F1 (micro-F1 for tags), and every C's score; (1.0, {})
    when there is no validation split or train holds one class only."""
    from sklearn.metrics import f1_score

    if not validation or (not multi_label and len({r["label"] for r in train}) < 2):
        return 1.0, {}
    scores = {}
    for c in C_GRID:
        model = _fit(train, label_space, c, multi_label, seed)
        pred = model.predict([r["text"] for r in validation])
        truth = _targets(validation, multi_label, label_space)
        scores[c] = float(f1_score(truth, pred, average="micro" if multi_label else "macro", zero_division=0,
                                   **({} if multi_label else {"labels": list(label_space)})))
    best = max(C_GRID, key=lambda c: (scores[c], -abs(c - 1.0)))  # ties: the one nearest the default
    return best, scores


def score_classical(train: Sequence[dict], validation: Sequence[dict], test: Sequence[dict],
                    label_space: Sequence[str], *, multi_label: bool = False, seed: int = 13) -> tuple[Scored, dict]:
    """Train on `train` (C chosen on `validation`), predict `test`: (the answers, what was chosen)."""
    if not train:
        raise ValueError("the classical baseline needs train rows; the run carries none")
    if not multi_label and len({r["label"] for r in train}) < 2:
        raise ValueError("the classical baseline needs at least two labels among the train rows")
    t0 = time.perf_counter()
    c, grid = choose_c(train, validation, label_space, multi_label=multi_label, seed=seed)
    model = _fit(train, label_space, c, multi_label, seed)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    outputs = _predict(model, [r["text"] for r in test], multi_label, label_space)
    predict_s = time.perf_counter() - t1
    per_row_ms = predict_s * 1000 / max(1, len(test))
    scored = Scored(model=NAME, outputs=outputs, latency_ms=[per_row_ms] * len(test), compute_s=predict_s)
    return scored, {"C": c, "validation_f1_by_C": {str(k): v for k, v in grid.items()}, "fit_s": round(fit_s, 3),
                    "train_rows": len(train), "validation_rows": len(validation)}


TRIAGE_NAME = "classical:tfidf-logreg-per-field"


def _field_value(row: dict, name: str):
    """A single-valued triage field of a row: the label, or a head's value (the first of a list); None when absent."""
    v = row.get("label") if name == "label" else (row.get("heads") or {}).get(name)
    if isinstance(v, list):
        v = next((x for x in v if x is not None and str(x) != ""), None)
    return None if v is None or str(v) == "" else str(v)


def score_classical_triage(train: Sequence[dict], validation: Sequence[dict], test: Sequence[dict], *,
                           seed: int = 13) -> tuple[Scored, dict]:
    """One TF-IDF + logistic regression per field of triage rows (label, each head, tags), each trained on
    the train rows with a value for it, C chosen on the validation rows: (a dict per test row, what was
    chosen per field). A field with one value among the train rows is answered with that value."""
    if not train:
        raise ValueError("the classical baseline needs train rows; the run carries none")
    if len({r["label"] for r in train}) < 2:
        raise ValueError("the classical baseline needs at least two labels among the train rows")
    t0 = time.perf_counter()
    fields = ["label", *sorted({h for r in train for h in (r.get("heads") or {})})]
    texts = [r["text"] for r in test]
    answers: dict[str, list] = {}
    info: dict[str, dict] = {}
    predict_s = 0.0
    for name in fields:
        tr = [{"text": r["text"], "label": v} for r in train if (v := _field_value(r, name)) is not None]
        va = [{"text": r["text"], "label": v} for r in validation if (v := _field_value(r, name)) is not None]
        space = sorted({r["label"] for r in tr})
        if not space:
            continue
        if len(space) == 1:
            answers[name] = [space[0]] * len(test)
            info[name] = {"constant": space[0], "train_rows": len(tr)}
            continue
        va = [r for r in va if r["label"] in space]  # a value no train row has cannot be learned, nor choose C
        c, grid = choose_c(tr, va, space, seed=seed)
        model = _fit(tr, space, c, False, seed)
        t1 = time.perf_counter()
        answers[name] = _predict(model, texts, False, space)
        predict_s += time.perf_counter() - t1
        info[name] = {"C": c, "validation_f1_by_C": {str(k): v for k, v in grid.items()}, "train_rows": len(tr),
                      "labels": len(space)}
    tag_space = sorted({t for r in train for t in r.get("tags") or []})
    if any("tags" in r for r in train) and tag_space:
        c, grid = choose_c(train, validation, tag_space, multi_label=True, seed=seed)
        model = _fit(train, tag_space, c, True, seed)
        t1 = time.perf_counter()
        answers["tags"] = _predict(model, texts, True, tag_space)
        predict_s += time.perf_counter() - t1
        info["tags"] = {"C": c, "validation_f1_by_C": {str(k): v for k, v in grid.items()}, "train_rows": len(train),
                        "labels": len(tag_space)}
    elif any("tags" in r for r in train):
        answers["tags"] = [[] for _ in test]
    outputs = [{name: col[i] for name, col in answers.items()} for i in range(len(test))]
    per_row_ms = predict_s * 1000 / max(1, len(test))
    scored = Scored(model=TRIAGE_NAME, outputs=outputs, latency_ms=[per_row_ms] * len(test), compute_s=predict_s)
    return scored, {"fields": info, "fit_s": round(time.perf_counter() - t0 - predict_s, 3),
                    "train_rows": len(train), "validation_rows": len(validation)}
