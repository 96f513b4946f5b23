"""`tuneline eval show`: the report a person reads, built from the events an evaluation records."""

from __future__ import annotations

from services.cli import eval_cmds
from services.evaluator import domain
from services.evaluator.gate import GatePolicy, decide
from services.evaluator.scoring import Scored

SPACE = ["bug", "feature", "question"]


def _events(candidate_right: int, n: int = 60):
    rows = [{"row_id": f"r{i}", "text": f"t{i}", "label": SPACE[i % 3]} for i in range(n)]
    cand = Scored("candidate", [r["label"] if i < candidate_right else "bug" for i, r in enumerate(rows)], [1.0] * n)
    base = Scored("classical:tfidf-logreg", [r["label"] if i % 2 else "feature" for i, r in enumerate(rows)], [0.1] * n)
    j = domain.judge_rows(rows, cand, base, kind="single_label", weights={}, bucket_fields=[])
    decision = decide(j.candidate_scores, j.baseline_scores, j.row_ids, j.buckets, GatePolicy())
    cr = domain.model_report(rows, cand, j.candidate_scores, kind="single_label", label_space=SPACE, usd_per_hour=1)
    br = domain.model_report(rows, base, j.baseline_scores, kind="single_label", label_space=SPACE, usd_per_hour=1)
    gate = {"passed": decision.passed, "failed": [{"reason_code": f.reason_code, "message": f.message} for f in decision.failed],
            "baseline": base.model, "evidence": decision.as_evidence()}
    completed = {"candidate": {"n": n}, "baseline_kind": "classical", "candidate_report": cr.model_dump(),
                 "baseline_report": br.model_dump(), "test_set_sha256": "ab" * 32, "warnings": []}
    validated = {"judge": {"judge_id": "rubric:x"}, "accuracy": 1.0, "cohen_kappa": 1.0, "n_gold": n, "n_wrong": n,
                 "passed": True}
    return [{"type": t, "event_id": i, "payload": p} for i, (t, p) in enumerate(
        [("judge.validated", validated), ("eval.gate_decided", gate), ("eval.completed", completed)])]


def test_the_report_shows_both_models_per_class_and_a_passing_decision():
    report = eval_cmds.report_of([{"type": "run.start", "event_id": "x", "payload": {}}, *_events(60)])
    text = eval_cmds.render(report)
    assert "candidate vs classical baseline classical:tfidf-logreg on 60 test rows" in text
    assert "question" in text and "base F1" in text
    assert "decision: PASSED" in text
    assert eval_cmds.decision_in_words(report).startswith("gate passed")


def test_a_failing_decision_names_each_failed_criterion():
    report = eval_cmds.report_of(_events(20))
    text = eval_cmds.render(report)
    assert "decision: FAILED" in text
    assert "gate.delta_below_margin" in text and "regressed rows:" in text
    assert "gate.delta_below_margin" in eval_cmds.decision_in_words(report)


def test_a_failed_evaluation_says_why_and_no_report_is_none():
    failed = [{"type": "eval.failed", "event_id": 1, "reason_code": "eval.no_test_set", "payload": {"message": "none"}}]
    assert eval_cmds.render(eval_cmds.report_of(failed)).startswith("evaluation failed: eval.no_test_set")
    assert eval_cmds.report_of([{"type": "run.start", "event_id": 1, "payload": {}}]) is None


# --- `tuneline run --evaluation FILE`: checked at the prompt ---------------------------------------


def _run_with(tmp_path, monkeypatch, capsys, text: str):
    from services.cli import main
    from tests.unit.cli_support import run_cli

    published = []

    async def capture(cmd, **kw):
        published.append(cmd)
        return "run-x"

    monkeypatch.setattr(main, "publish_command", capture)
    f = tmp_path / "evaluation.yaml"
    f.write_text(text)
    code, _, err = run_cli(["run", "--locator", "jsonl:x.jsonl", "--target", "ok", "--evaluation", str(f),
                            "--no-wait"], capsys)
    return code, err, published


def test_an_evaluation_file_sets_the_judge_and_the_gate(tmp_path, monkeypatch, capsys, cli_data_dir):
    code, err, published = _run_with(tmp_path, monkeypatch, capsys, """
judge: {kind: rubric, weights: {label: 2}}
gate: {min_delta: 0.03, bucket_fields: [project], safety_buckets: ["class=Blocker"]}
""")
    assert code == 0, err
    ev = published[0].plan.evaluation
    assert ev.judge.weights == {"label": 2.0} and ev.gate.min_delta == 0.03
    assert ev.gate.bucket_fields == ["project"] and ev.gate.safety_buckets == ["class=Blocker"]


def test_a_bad_evaluation_file_gets_one_line_per_problem_and_nothing_is_published(tmp_path, monkeypatch, capsys,
                                                                                  cli_data_dir):
    code, err, published = _run_with(tmp_path, monkeypatch, capsys,
                                     "judge: {kind: oracle}\ngate: {alpha: 2}\n")
    assert code == 2 and not published
    lines = err.strip().splitlines()
    assert any(line.startswith("tuneline run: --evaluation (judge.kind): ") for line in lines), lines
    assert any(line.startswith("tuneline run: --evaluation (gate.alpha): ") for line in lines), lines
    code, err, published = _run_with(tmp_path, monkeypatch, capsys, "judge: [unclosed\n")
    assert code == 2 and not published and "does not parse as YAML or JSON" in err
