"""Evaluation and the gate on real data (issue "Evaluate against production"): what the evaluator
decides for a real candidate against the classical baseline, and for a second run against the first
as production.

    python -m bench.evaluation [--jira-rows 2400] [--epochs 3] [--nlbse-repo facebook/react]

Each dataset goes through ingest and prep as a user's run does (cleaning on, three splits: test
0.2, validation 0.1 of the rest, seed 13); the test split is never trained or tuned on. Then:

1. candidate A: `train()` of the local engine with `seqcls-lora-minilm` (mean pooling) on the train
   split, validated on the validation split (best checkpoint), scored on the test split;
2. the classical baseline (TF-IDF + logistic regression, C chosen on the validation split) trained
   on the same train split, scored on the same test rows;
3. `assess()` — the evaluator's own per-row records, rubric judge and its validation, and the gate
   (policy gate-v2: delta >= 0.05, p < 0.05, buckets, regressions) — A against the baseline;
4. candidate B: the same target again with another seed, assessed against A as production.

Datasets: Apache JIRA priority (the severity field, buckets by project; a seeded sample of the
`train` rows of bugs_train_val.jsonl, text = summary + description) and one NLBSE'24 repository.
Writes bench/results/evaluation.json; skips a dataset that is absent (exit 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATASETS = ROOT.parent / "shared" / "datasets"
JIRA = DATASETS / "apache_jira_bugs" / "bugs_train_val.jsonl"
NLBSE = DATASETS / "nlbse24_issue_report_classification" / "issues_train.csv"
SEED = 13
RECIPE = "seqcls-lora-minilm"


def jira_rows(n: int, seed: int = SEED) -> list[dict]:
    rows = []
    with open(JIRA, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == "train":
                rows.append({"summary": r["summary"], "description": r.get("description") or "",
                             "priority": r["priority"], "project": r["project"]})
    random.Random(seed).shuffle(rows)
    return rows[:n]


def nlbse_rows(repo: str) -> list[dict]:
    from bench.nlbse import load_repos

    return load_repos(NLBSE)[repo]


def prep(rows: list[dict], mapping, tmp: Path, target: str) -> dict:
    """Ingest and prep the rows as a run does: (train, validation, test) rows and the label space."""
    from contracts.common import RunPlan
    from services.common.artifacts import ArtifactStore
    from services.common.jsonl import read_jsonl
    from services.ingest.domain import run_ingest
    from services.ingest.sources.jsonl import JsonlSource
    from services.prep.domain import prepare

    src = tmp / f"{target}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    store = ArtifactStore(tmp / "artifacts")
    ingested = run_ingest(JsonlSource(src), mapping, store, commit=True)
    plan = RunPlan(locator=f"jsonl:{src}", target=target, mapping=mapping, until="prep", seed=SEED)
    p = prepare(read_jsonl(store, ingested.dataset), plan, store)
    return {"train": read_jsonl(store, p.train), "validation": read_jsonl(store, p.eval),
            "test": read_jsonl(store, p.test), "label_space": p.label_space}


def train_candidate(d: dict, overrides: dict, work: Path):
    from services.trainer.local.engine import train
    from services.trainer.local.tasks import SequenceClassification
    from services.trainer.recipes import resolve_recipe

    recipe = resolve_recipe(RECIPE, "single_label_classification", overrides)
    outcome = train(SequenceClassification(d["label_space"]), recipe, d["train"], d["validation"], work / "work",
                    work / "adapter", progress_every_s=5.0)
    return recipe, outcome


def score_candidate(name: str, recipe, adapter_dir: Path, d: dict):
    from services.common.models import resolve_base_model
    from services.evaluator.adapters.classifier import predict
    from services.evaluator.scoring import Scored

    t0 = time.perf_counter()
    out, lat = predict(resolve_base_model(recipe.base_model), adapter_dir, [r["text"] for r in d["test"]],
                       d["label_space"], recipe.max_length, 64, recipe.seed)
    return Scored(model=name, outputs=out, latency_ms=lat, compute_s=time.perf_counter() - t0)


def _row(dataset: str, comparison: str, a, kinds: dict) -> dict:
    ev = a.decision.as_evidence()
    return {"dataset": dataset, "comparison": comparison, "n": ev["n"],
            "candidate_accuracy": a.candidate_report.metrics["accuracy"],
            "candidate_macro_f1": a.candidate_report.metrics["macro_f1"],
            "baseline_accuracy": a.baseline_report.metrics["accuracy"],
            "baseline_macro_f1": a.baseline_report.metrics["macro_f1"],
            "candidate_judge_mean": ev["candidate_mean"], "baseline_judge_mean": ev["baseline_mean"],
            "delta": ev["delta"], "ci": [ev["ci_low"], ev["ci_high"]], "test": ev["test"], "p_value": ev["p_value"],
            "passed": a.passed, "failed": [f.reason_code for f in a.failed],
            "worst_bucket": min(ev["buckets"].items(), key=lambda kv: kv[1]["delta"])[0] if ev["buckets"] else None,
            "candidate_latency_ms_p50": a.candidate_report.latency_ms_p50,
            "warnings": [w.reason_code for w in a.warnings], **kinds}


def run_dataset(name: str, rows: list[dict], mapping, target: str, bucket_fields: list[str], epochs: float) -> list[dict]:
    from contracts.common import EvaluationSettings, GateSettings
    from services.evaluator.adapters.classical import score_classical
    from services.evaluator.domain import assess

    settings = EvaluationSettings(gate=GateSettings(bucket_fields=bucket_fields))
    out = []
    with tempfile.TemporaryDirectory(prefix="tuneline-bench-eval-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        d = prep(rows, mapping, tmp, target)
        print(f"{name}: {len(d['train'])} train / {len(d['validation'])} validation / {len(d['test'])} test rows, "
              f"{len(d['label_space'])} labels (prep {time.perf_counter() - t0:.0f}s)", flush=True)
        base, info = score_classical(d["train"], d["validation"], d["test"], d["label_space"], seed=SEED)
        recipe_a, a = train_candidate(d, {"seed": SEED, "epochs": epochs}, tmp / "a")
        cand_a = score_candidate("candidate:A", recipe_a, a.adapter_dir, d)
        print(f"  candidate A trained in {a.wall_s:.0f}s ({a.steps} steps, best step {a.best_step})", flush=True)
        vs_base = assess(d["test"], cand_a, base, kind="single_label", label_space=d["label_space"], settings=settings)
        out.append(_row(name, "A vs classical baseline", vs_base,
                        {"train_wall_s": round(a.wall_s, 1), "baseline_C": info["C"]}))
        recipe_b, b = train_candidate(d, {"seed": SEED + 1, "epochs": epochs}, tmp / "b")
        cand_b = score_candidate("candidate:B", recipe_b, b.adapter_dir, d)
        print(f"  candidate B trained in {b.wall_s:.0f}s", flush=True)
        production = dataclasses.replace(cand_a, model="production:A")
        vs_prod = assess(d["test"], cand_b, production, kind="single_label", label_space=d["label_space"],
                         settings=settings)
        out.append(_row(name, "B (seed 14) vs A as production", vs_prod, {"train_wall_s": round(b.wall_s, 1)}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jira-rows", type=int, default=2400)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--nlbse-repo", default="facebook/react")
    ap.add_argument("--datasets", default="jira,nlbse", help="which of jira, nlbse to run (comma-separated)")
    a = ap.parse_args()
    from contracts.common import FieldMapping

    rows: list[dict] = []
    t0 = time.perf_counter()
    chosen = set(a.datasets.split(","))
    if "jira" in chosen:
        if JIRA.exists():
            mapping = FieldMapping(shape="multi_field_triage", text=["summary", "description"], label="priority",
                                   heads={"project": "project"})
            rows += run_dataset("jira-priority", jira_rows(a.jira_rows), mapping, "jira-priority", ["project"],
                                a.epochs)
        else:
            print(f"skipping JIRA: {JIRA} is absent")
    if "nlbse" in chosen:
        if NLBSE.exists():
            mapping = FieldMapping(text=["text"], label="label")
            rows += run_dataset(f"nlbse:{a.nlbse_repo}", nlbse_rows(a.nlbse_repo), mapping, "nlbse", [], 10.0)
        else:
            print(f"skipping NLBSE: {NLBSE} is absent")
    if not rows:
        return
    print()
    print(f"{'dataset':<26}{'comparison':<34}{'n':>5}{'cand F1':>9}{'base F1':>9}{'cand J':>8}{'base J':>8}"
          f"{'delta':>8}{'p':>9}  decision")
    for r in rows:
        print(f"{r['dataset']:<26}{r['comparison']:<34}{r['n']:>5}{r['candidate_macro_f1']:>9.3f}{r['baseline_macro_f1']:>9.3f}"
              f"{r['candidate_judge_mean']:>8.3f}{r['baseline_judge_mean']:>8.3f}{r['delta']:>+8.3f}{r['p_value']:>9.4f}  "
              f"{'PASS' if r['passed'] else 'fail: ' + ', '.join(r['failed'])}")
    print(f"evaluation bench wall time: {time.perf_counter() - t0:.0f}s")
    first = rows[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "evaluation.json").write_text(json.dumps({
        "name": "evaluation_real_data", "figure": first["delta"], "unit": "judge-mean delta (candidate - baseline)",
        "baseline": first["baseline_judge_mean"], "ratio": (first["candidate_judge_mean"] / first["baseline_judge_mean"]
                                                            if first["baseline_judge_mean"] else None),
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
