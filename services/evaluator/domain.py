"""The evaluator's decisions, pure: the per-row records of a candidate and its baseline (D16), each
model's report, the judge's validation against gold, and the warnings an evaluation carries. The
gate itself is services/evaluator/gate.py; the models that answer are in adapters/."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from contracts.events import JudgeRef, ModelReport, Notice
from services.common import metrics
from services.evaluator.scoring import (Scored, buckets_of, field_scores, gold_of, input_sha256, row_id, rubric_score,
                                        wrong_output)

DEGENERATE_SHARE = 0.95  # a model answering one class on this share of the rows predicts nothing
TRIAGE_TASK = "multi_field_triage"  # the multi-head encoder (services/trainer/local/tasks.py)
SEVERITY_HEADS = ("severity", "priority")  # triage heads read as a severity scale, by name


def kind_of(task: str | None, shape: str | None) -> str:
    """How a candidate's rows are scored: single_label, multi_label, triage (a model answering every
    field: the multi-head encoder, or a chat model answering JSON), json or text. A single-label
    classifier trained on triage rows answers their lead label."""
    if task == "multi_label_classification":
        return "multi_label"
    if task == TRIAGE_TASK:
        return "triage"
    if shape in (None, "single_label_classification"):
        return "single_label"
    if shape == "multi_field_triage":
        return "triage" if task == "chat_sft" else "single_label"
    if shape == "json_extraction":
        return "json"
    if shape in ("chat_messages", "prompt_completion"):
        return "text"
    raise ValueError(f"no scorer for a {task or 'hosted'} candidate on {shape} rows")


def severity_field(rows: Sequence[dict], kind: str) -> str | None:
    """The triage field whose calibration is reported: a head named severity or priority (any case),
    else the lead label when every value sits on a known severity scale (metrics.SEVERITY_ORDERS),
    else none."""
    if kind != "triage":
        return None
    names = {name for r in rows for name in (r.get("heads") or {})}
    for name in sorted(names):
        if name.casefold() in SEVERITY_HEADS:
            return name
    labels = [r.get("label") for r in rows if r.get("label") is not None]
    return "label" if labels and metrics.severity_order([str(v) for v in labels]) else None


@dataclass(frozen=True)
class Judged:
    """Both models' per-row records and the paired judge scores the gate reads."""

    records: list[dict]
    candidate_scores: list[float]
    baseline_scores: list[float]
    row_ids: list[str]
    buckets: list[dict[str, str]]


def judge_rows(rows: Sequence[dict], candidate: Scored, baseline: Scored, *, kind: str, weights: Mapping[str, float],
               bucket_fields: Sequence[str], judge_scores: Mapping[str, Sequence[float]] | None = None) -> Judged:
    """One record per test row and model: output, per-field correctness, judge score, latency, tokens.
    `judge_scores` (model name -> per-row scores) comes from an LLM judge; without it the rubric judges."""
    for s in (candidate, baseline):
        if len(s.outputs) != len(rows):
            raise ValueError(f"{s.model} answered {len(s.outputs)} of {len(rows)} test rows")
    ids = [row_id(r) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("the test set holds two rows with one row_id")
    records, per_model = [], {}
    bucket_rows = [buckets_of(r, kind, bucket_fields) for r in rows]
    for scored in (candidate, baseline):
        scores = []
        for i, row in enumerate(rows):
            gold = gold_of(row, kind)
            correct = field_scores(gold, scored.outputs[i], kind)
            score = (judge_scores[scored.model][i] if judge_scores and scored.model in judge_scores
                     else rubric_score(correct, weights))
            scores.append(score)
            records.append({
                "row_id": ids[i], "model": scored.model, "input_sha256": input_sha256(row),
                "output": scored.outputs[i], "gold": gold, "correct": correct, "judge_score": score,
                "latency_ms": round(scored.latency_ms[i], 3),
                "tokens": scored.tokens[i] if scored.tokens else None, "buckets": bucket_rows[i],
            })
        per_model[scored.model] = scores
    return Judged(records, per_model[candidate.model], per_model[baseline.model], ids, bucket_rows)


def validate_rubric(rows: Sequence[dict], *, kind: str, weights: Mapping[str, float], label_space: Sequence[str],
                    min_agreement: float) -> dict[str, Any]:
    """Run the judge over each row's gold output and a known-wrong one: a judge that cannot tell them
    apart (weights on fields the rows lack, a broken comparison) must not gate. Agreement is the
    share of verdicts right at the midpoint (gold >= 0.5, wrong < 0.5) and Cohen's kappa of the
    verdicts against the truth."""
    gold_scores, wrong_scores = [], []
    for r, wrong in zip(rows, wrong_outputs(rows, kind, label_space)):
        g = gold_of(r, kind)
        gold_scores.append(rubric_score(field_scores(g, g, kind), weights))
        wrong_scores.append(rubric_score(field_scores(g, wrong, kind), weights))
    return judge_agreement(gold_scores, wrong_scores, min_agreement)


def wrong_outputs(rows: Sequence[dict], kind: str, label_space: Sequence[str]) -> list[Any]:
    """A known-wrong answer for every row (see scoring.wrong_output), from the values the rows hold."""
    values: dict[str, list] = {}
    for r in rows:
        g = gold_of(r, kind)
        pairs = g.items() if isinstance(g, Mapping) else [("answer", g)] if kind == "text" else []
        for k, v in pairs:
            if not isinstance(v, list) and v is not None and v not in values.setdefault(k, []):
                values[k].append(v)
    return [wrong_output(gold_of(r, kind), kind, label_space, values) for r in rows]


def judge_agreement(gold_scores: Sequence[float], wrong_scores: Sequence[float], min_agreement: float) -> dict[str, Any]:
    from sklearn.metrics import cohen_kappa_score

    truth = [1] * len(gold_scores) + [0] * len(wrong_scores)
    verdict = [int(s >= 0.5) for s in gold_scores] + [int(s >= 0.5) for s in wrong_scores]
    accuracy = sum(t == v for t, v in zip(truth, verdict)) / len(truth) if truth else 0.0
    # kappa is undefined (nan) when the verdicts are all one value: no agreement beyond chance then
    kappa = float(cohen_kappa_score(truth, verdict)) if len(set(verdict)) > 1 else 0.0
    return {"n_gold": len(gold_scores), "n_wrong": len(wrong_scores), "accuracy": accuracy, "cohen_kappa": kappa,
            "gold_mean": statistics.fmean(gold_scores) if gold_scores else 0.0,
            "wrong_mean": statistics.fmean(wrong_scores) if wrong_scores else 0.0,
            "min_agreement": min_agreement, "passed": bool(truth) and accuracy >= min_agreement}


def model_report(rows: Sequence[dict], scored: Scored, scores: Sequence[float], *, kind: str, label_space: Sequence[str],
                 usd_per_hour: float, severity_field: str | None = None) -> ModelReport:
    """Metrics of one model's answers: the classification report (per field for triage, tag F1 for
    multi-label), the judge mean, latency p50/p95 and the cost of 1,000 answers."""
    from services.evaluator.scoring import percentile

    if kind == "single_label":
        m = metrics.classification_report([r["label"] for r in rows], scored.outputs, list(label_space))
    elif kind == "multi_label":
        m = metrics.tag_report([r.get("tags") or [] for r in rows], scored.outputs, list(label_space))
    else:
        m = {"fields": metrics.triage_report([gold_of(r, kind) for r in rows], scored.outputs, {"label": label_space},
                                             severity_field=severity_field)}
    n = len(rows)
    if scored.usd is not None:
        usd_per_1k = scored.usd / n * 1000 if n else None
    else:
        usd_per_1k = scored.compute_s / 3600 * usd_per_hour / n * 1000 if n else None
    tokens = [t for t in scored.tokens if t is not None]
    return ModelReport(
        model=scored.model, n=n, judge_mean=statistics.fmean(scores) if scores else 0.0, metrics=m,
        latency_ms_p50=percentile(scored.latency_ms, 50), latency_ms_p95=percentile(scored.latency_ms, 95),
        usd_per_1k=usd_per_1k, tokens_median=statistics.median(tokens) if tokens else None,
        unparseable=sum(o is None for o in scored.outputs),
    )


def evaluation_warnings(rows: Sequence[dict], scored: Scored, *, kind: str, label_space: Sequence[str]) -> list[Notice]:
    """What a reader of the candidate's evaluation must know: a degenerate model, unparseable answers,
    labels the test set cannot judge."""
    out = []
    n = len(rows)
    if kind == "single_label" and n:
        top, count = Counter(o for o in scored.outputs).most_common(1)[0]
        if count / n >= DEGENERATE_SHARE and len({r["label"] for r in rows}) > 1:
            out.append(Notice(reason_code="eval.degenerate_model",
                              message=f"{scored.model} answers {top!r} for {count} of {n} test rows"))
        missing = sorted(set(label_space) - {r["label"] for r in rows})
        if missing:
            out.append(Notice(reason_code="eval.class_missing_from_test",
                              message=f"{len(missing)} label(s) have no test row, so nothing judges them: "
                                      f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"))
    bad = sum(o is None for o in scored.outputs)
    if bad:
        out.append(Notice(reason_code="eval.unparseable_output",
                          message=f"{scored.model}: {bad} of {n} answers could not be parsed; they score 0"))
    return out


def rubric_ref(weights: Mapping[str, float]) -> JudgeRef:
    from services.evaluator.scoring import rubric_judge_id

    return JudgeRef(judge_id=rubric_judge_id(weights), kind="rubric", weights=dict(weights))


@dataclass(frozen=True)
class Assessment:
    """A candidate against its baseline on one test set: records, judge validation, reports, gate."""

    judged: Judged
    judge: JudgeRef
    validation: dict[str, Any]
    candidate_report: ModelReport
    baseline_report: ModelReport
    warnings: list[Notice]
    decision: Any                 # services.evaluator.gate.GateDecision
    passed: bool                  # the gate's verdict, and the judge validated
    failed: list[Notice]
    policy: Any                   # the GatePolicy the decision was taken under

    @property
    def evidence(self) -> dict[str, Any]:
        """The gate's evidence with the policy in full: with the per-row records, all it takes to
        re-derive the decision (`decide(scores..., GatePolicy(**evidence["policy"]))`)."""
        return {**self.decision.as_evidence(), "policy": self.policy.as_dict()}


def gate_policy(settings) -> Any:
    from services.evaluator.gate import GatePolicy

    g = settings.gate
    return GatePolicy(min_delta=g.min_delta, alpha=g.alpha, max_bucket_drop=g.max_bucket_drop,
                      max_regressed_share=g.max_regressed_share, safety_buckets=tuple(g.safety_buckets))


def assess(rows: Sequence[dict], candidate: Scored, baseline: Scored, *, kind: str, label_space: Sequence[str],
           settings, judge_scores: Mapping[str, Sequence[float]] | None = None, judge: JudgeRef | None = None,
           validation: dict[str, Any] | None = None, severity_field: str | None = None) -> Assessment:
    """Judge both models row by row (the rubric unless an LLM judge's scores are given, with its own
    validation), report each, and run the gate (`settings`: the plan's EvaluationSettings). A judge
    that failed its validation may not gate: the decision fails with eval.judge_unvalidated."""
    from services.evaluator.gate import decide

    weights = dict(settings.judge.weights)
    judged = judge_rows(rows, candidate, baseline, kind=kind, weights=weights, bucket_fields=settings.gate.bucket_fields,
                        judge_scores=judge_scores)
    if judge is None:
        judge = rubric_ref(weights)
        validation = validate_rubric(rows, kind=kind, weights=weights, label_space=label_space,
                                     min_agreement=settings.judge.min_agreement)
    assert validation is not None, "an LLM judge comes with its validation"
    reports = [model_report(rows, s, scores, kind=kind, label_space=label_space,
                            usd_per_hour=settings.local_usd_per_hour, severity_field=severity_field)
               for s, scores in ((candidate, judged.candidate_scores), (baseline, judged.baseline_scores))]
    policy = gate_policy(settings)
    decision = decide(judged.candidate_scores, judged.baseline_scores, judged.row_ids, judged.buckets, policy)
    failed = [Notice(reason_code=f.reason_code, message=f.message) for f in decision.failed]
    if not validation["passed"]:
        failed.insert(0, Notice(reason_code="eval.judge_unvalidated",
                                message=f"judge {judge.judge_id} separated gold from wrong answers on "
                                        f"{validation['accuracy']:.0%} of verdicts, below {validation['min_agreement']:.0%}"))
    return Assessment(judged, judge, validation, reports[0], reports[1],
                      evaluation_warnings(rows, candidate, kind=kind, label_space=label_space), decision,
                      decision.passed and validation["passed"], failed, policy)
