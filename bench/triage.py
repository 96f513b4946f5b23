"""Multi-field triage in one model against one model per field (issue 17), on Apache JIRA bugs.

    python -m bench.triage [--rows 2000] [--epochs 3] [--budget total|per-model]

Rows: a seeded sample of the `train` rows of bugs_train_val.jsonl; text = summary + description; the
fields: project (the lead label), priority (the `severity` head), the first component (the `component`
head; none when the issue has none) and labels (tags). They go through ingest and prep as a run's rows
do (cleaning on; test 0.2, validation 0.1 of the rest, stratified by project, seed 13). Then, trained
on the same train rows (validation rows for the best checkpoint) and scored on the same test rows:

1. triage: `triage-lora-minilm`, one encoder with a head per field, every field at once;
2. per field: `seqcls-lora-minilm` for project, severity and component (on the rows that have one),
   `multilabel-lora-minilm` for tags. Same total budget (default): the per-field models share the
   triage model's optimizer steps equally; `--budget per-model` gives each of them as many;
3. classical: one TF-IDF + logistic regression per field (the evaluator's baseline), for reference.

Quality per field is the evaluator's own report (metrics.triage_report: accuracy and macro-F1 of each
label field over its rows with a value, severity calibration, tag micro-F1) and the rubric judge's mean
(every field weighing 1); wall time is training plus scoring the test rows. The figure is the mean of
the per-field F1 (macro for label fields, micro for tags) of the triage model; the baseline the same
for the per-field models. Writes bench/results/triage.json; skips when the dataset is absent (exit 0).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.evaluation import JIRA, RESULTS, SEED, prep

FIELDS = ("label", "severity", "component", "tags")
FIELD_SOURCE = {"label": "project", "severity": "priority", "component": "components[0]", "tags": "labels"}


def jira_triage_rows(n: int, seed: int = SEED) -> list[dict]:
    rows = []
    with open(JIRA, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == "train":
                components = r.get("components") or []
                rows.append({"summary": r["summary"], "description": r.get("description") or "",
                             "project": r["project"], "priority": r["priority"],
                             "component": components[0] if components else None, "labels": r.get("labels") or []})
    random.Random(seed).shuffle(rows)
    return rows[:n]


def mapping():
    from contracts.common import FieldMapping

    return FieldMapping(shape="multi_field_triage", text=["summary", "description"], label="project",
                        heads={"severity": "priority", "component": "component"}, tags="labels")


def field_rows(rows: list[dict], field: str) -> list[dict]:
    """A triage split as one field's single-label (or, for tags, multi-label) rows."""
    from services.trainer.local.tasks import head_value

    if field == "tags":
        return [{"text": r["text"], "tags": list(r.get("tags") or [])} for r in rows]
    if field == "label":
        return [{"text": r["text"], "label": r["label"]} for r in rows]
    return [{"text": r["text"], "label": v} for r in rows if (v := head_value((r.get("heads") or {}).get(field)))]


def _train(task, recipe_name: str, overrides: dict, train_rows: list[dict], val_rows: list[dict], work: Path):
    from services.trainer.local.engine import train
    from services.trainer.recipes import resolve_recipe

    recipe = resolve_recipe(recipe_name, "multi_field_triage", overrides)
    return recipe, train(task, recipe, train_rows, val_rows, work / "work", work / "adapter", progress_every_s=30.0)


def _predict(recipe, adapter_dir: Path, texts: list[str], label_space: list[str], multi_label: bool = False):
    from services.common.classifier_inference import predict
    from services.common.models import resolve_base_model

    return predict(resolve_base_model(recipe.base_model), adapter_dir, texts, label_space, recipe.max_length, 64,
                   recipe.seed, multi_label=multi_label)[0]


def run_triage(d: dict, overrides: dict, tmp: Path) -> tuple[list[dict], dict]:
    from services.trainer.local.tasks import MultiFieldTriage

    t0 = time.perf_counter()
    tag_space = sorted({t for r in d["train"] + d["validation"] for t in r.get("tags") or []})
    task = MultiFieldTriage(d["label_space"], tag_space)
    recipe, out = _train(task, "triage-lora-minilm", overrides, d["train"], d["validation"], tmp / "triage")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    answers = _predict(recipe, out.adapter_dir, [r["text"] for r in d["test"]], d["label_space"])
    return answers, {"train_s": train_s, "score_s": time.perf_counter() - t1, "steps": out.steps,
                     "best_step": out.best_step, "heads": [h.name for h in task.heads]}


def run_per_field(d: dict, overrides: dict, steps_each: int | None, tmp: Path) -> tuple[list[dict], dict]:
    from services.trainer.local.tasks import SequenceClassification

    texts = [r["text"] for r in d["test"]]
    answers: dict[str, list] = {}
    info: dict[str, dict] = {}
    for field in FIELDS:
        t0 = time.perf_counter()
        tr, va = field_rows(d["train"], field), field_rows(d["validation"], field)
        multi = field == "tags"
        space = (sorted({t for r in tr + va for t in r["tags"]}) if multi
                 else d["label_space"] if field == "label" else sorted({r["label"] for r in tr + va}))
        if (len(space) < 1 if multi else len(space) < 2) or not tr:
            answers[field] = [[] if multi else (space[0] if space else None)] * len(texts)
            info[field] = {"skipped": f"{len(space)} label(s) among {len(tr)} train rows"}
            continue
        o = dict(overrides)
        if steps_each is not None:  # the triage model's steps, shared out: epochs as many as the cap allows
            o.update(max_steps=steps_each, epochs=1000.0)
        recipe, out = _train(SequenceClassification(space, multi_label=multi),
                             "multilabel-lora-minilm" if multi else "seqcls-lora-minilm", o, tr, va, tmp / field)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        answers[field] = _predict(recipe, out.adapter_dir, texts, space, multi_label=multi)
        info[field] = {"train_s": train_s, "score_s": time.perf_counter() - t1, "steps": out.steps,
                       "best_step": out.best_step, "train_rows": len(tr), "labels": len(space)}
        print(f"  per-field {field}: {len(tr)} train rows, {len(space)} labels, {out.steps} steps, "
              f"{train_s:.0f}s", flush=True)
    outputs = [{f: answers[f][i] for f in FIELDS} for i in range(len(texts))]
    trained = [v for v in info.values() if "train_s" in v]
    return outputs, {"train_s": sum(v["train_s"] for v in trained), "score_s": sum(v["score_s"] for v in trained),
                     "steps": sum(v["steps"] for v in trained), "fields": info}


def headline(report: dict) -> dict[str, float]:
    """Each field's F1: macro for a label field, micro for tags."""
    return {f: (m["micro_f1"] if "exact_set_accuracy" in m else m["macro_f1"]) for f, m in report.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000, help="JIRA rows sampled before prep")
    ap.add_argument("--epochs", type=float, default=3.0, help="epochs of the triage model")
    ap.add_argument("--budget", choices=("total", "per-model"), default="total",
                    help="total: the per-field models share the triage model's steps; per-model: each gets as many")
    a = ap.parse_args()
    if not JIRA.exists():
        print(f"skipping: {JIRA} is absent")
        return
    from contracts.common import EvaluationSettings
    from services.common import metrics
    from services.evaluator.adapters.classical import score_classical_triage
    from services.evaluator.domain import assess, severity_field
    from services.evaluator.scoring import Scored, field_scores, gold_of, rubric_score

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneline-bench-triage-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        d = prep(jira_triage_rows(a.rows), mapping(), tmp, "jira-triage")
        test = d["test"]
        with_component = sum(1 for r in d["train"] if (r.get("heads") or {}).get("component"))
        print(f"jira triage: {len(d['train'])} train / {len(d['validation'])} validation / {len(test)} test rows, "
              f"{len(d['label_space'])} projects, {with_component} train rows with a component "
              f"(prep {time.perf_counter() - t0:.0f}s)", flush=True)
        overrides = {"seed": SEED, "epochs": a.epochs}
        triage_out, triage_info = run_triage(d, overrides, tmp)
        print(f"  triage: {triage_info['steps']} steps, trained in {triage_info['train_s']:.0f}s", flush=True)
        steps_each = max(1, triage_info["steps"] // len(FIELDS)) if a.budget == "total" else None
        per_field_out, per_field_info = run_per_field(d, overrides, steps_each, tmp)
        t1 = time.perf_counter()
        classical, classical_info = score_classical_triage(d["train"], d["validation"], test, seed=SEED)
        classical_s = time.perf_counter() - t1

    gold = [gold_of(r, "triage") for r in test]
    sev = severity_field(test, "triage")
    models = {"triage": triage_out, "per-field": per_field_out, "classical": classical.outputs}
    reports = {name: metrics.triage_report(gold, out, {"label": d["label_space"]}, severity_field=sev)
               for name, out in models.items()}
    walls = {"triage": triage_info["train_s"] + triage_info["score_s"],
             "per-field": per_field_info["train_s"] + per_field_info["score_s"], "classical": classical_s}
    # the rubric judge's mean per model (every field weighing 1), and the gate: triage against per-field models
    judge_mean = {name: statistics.fmean(rubric_score(field_scores(g, o, "triage"), {}) for g, o in zip(gold, out))
                  for name, out in models.items()}
    verdict = assess(test, Scored(model="triage", outputs=triage_out, latency_ms=[0.0] * len(test)),
                     Scored(model="per-field", outputs=per_field_out, latency_ms=[0.0] * len(test)),
                     kind="triage", label_space=d["label_space"], settings=EvaluationSettings(), severity_field=sev)

    rows = []
    for field in FIELDS:
        for metric in ("accuracy", "macro_f1", "micro_f1", "mean_ordinal_error", "distribution_tvd"):
            values = {}
            for name, rep in reports.items():
                m = rep.get(field) or {}
                v = m.get(metric, (m.get("calibration") or {}).get(metric))
                if field == "tags" and metric == "accuracy":
                    v = m.get("exact_set_accuracy")
                if v is not None:
                    values[name] = v
            if values and not (field != "tags" and metric == "micro_f1"):
                rows.append({"field": field, "source": FIELD_SOURCE[field], "metric": metric,
                             "n": (reports["triage"].get(field) or {}).get("n"), **values})
    rows.append({"field": "all", "source": "", "metric": "judge_mean (rubric, weights 1)", **judge_mean})
    rows.append({"field": "all", "source": "", "metric": "wall_s (train + score)", **walls})
    figure = statistics.fmean(headline(reports["triage"]).values())
    baseline = statistics.fmean(headline(reports["per-field"]).values())

    print()
    print(f"{'field':<10}{'source':<15}{'metric':<32}{'n':>6}{'triage':>11}{'per-field':>11}{'classical':>11}")
    for r in rows:
        cells = "".join(f"{r[k]:>11.3f}" if isinstance(r.get(k), float | int) else f"{'-':>11}"
                        for k in ("triage", "per-field", "classical"))
        print(f"{r['field']:<10}{r['source']:<15}{r['metric']:<32}{r.get('n') or '':>6}{cells}")
    print(f"mean per-field F1: triage {figure:.3f}, per-field models {baseline:.3f}; "
          f"wall: triage {walls['triage']:.0f}s, per-field {walls['per-field']:.0f}s "
          f"(budget {a.budget}: {triage_info['steps']} vs {per_field_info['steps']} optimizer steps); "
          f"bench {time.perf_counter() - started:.0f}s")
    gate = verdict.decision.as_evidence()
    print(f"gate, triage vs per-field models: delta {gate['delta']:+.3f}, p {gate['p_value']:.4f}, "
          f"{'PASS' if verdict.passed else 'fail: ' + ', '.join(f.reason_code for f in verdict.failed)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "triage.json").write_text(json.dumps({
        "name": "triage_multi_head_vs_per_field", "figure": figure,
        "unit": "mean per-field F1 of the triage model (macro-F1 per label field, micro-F1 for tags)",
        "baseline": baseline, "ratio": figure / baseline if baseline else None,
        "rows": rows,
        "setup": {"jira_rows": a.rows, "epochs": a.epochs, "budget": a.budget, "train": len(d["train"]),
                  "validation": len(d["validation"]), "test": len(test), "severity_field": sev,
                  "triage": triage_info, "per_field": per_field_info, "classical": classical_info,
                  "gate_triage_vs_per_field": {k: gate[k] for k in ("n", "delta", "p_value", "test")},
                  "wall_ratio_triage_over_per_field": walls["triage"] / walls["per-field"] if walls["per-field"] else None},
    }, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
