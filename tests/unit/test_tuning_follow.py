"""What `tuneline run --tune` / `follow` and the timeline say of a tuned run: a line per trial (its validation
score, time and settings; diverged or cut-off trials in words), then the winner and the settings the final
model is trained with."""

from __future__ import annotations

from contracts.events import TrialCompleted, TuningCompleted
from services.audit.projections.timeline import stage_status, summarize
from services.cli.follow import PlainOutput, RunFollow, row_of, show
from tests.factories import envelope, successful_run

RUN = "run-tuned"


def trial(k: int, status: str = "completed", metric: float | None = None, is_best: bool = False) -> TrialCompleted:
    return TrialCompleted(trial=k, trials=3, settings={"learning_rate": 1e-3 * k, "epochs": 5.0}, status=status,
                          metric_name="macro_f1" if metric is not None else None, metric=metric,
                          best_step=12 if metric is not None else None, steps=30, wall_s=41.27, train_rows=160,
                          validation_rows=20, is_best=is_best,
                          reason_code={"diverged": "training.diverged", "cut_off": "training.timeout"}.get(status))


def tuned() -> TuningCompleted:
    return TuningCompleted(trials_run=3, trials_planned=4, budget_minutes=3, stopped_by_budget=True, best_trial=2,
                           best_settings={"learning_rate": 2e-3, "epochs": 5.0}, metric_name="macro_f1",
                           best_metric=0.812, baseline_metric=0.74, wall_s=124.0, train_sha256="a" * 64,
                           validation_sha256="b" * 64)


def test_each_trial_and_the_winner_read_as_one_line():
    assert (summarize("training.trial_completed", trial(2, metric=0.8123, is_best=True).model_dump(mode="json"), None)
            == "trial 2/3: validation macro_f1 0.812 at step 12 (best so far), 41.3s; epochs=5 learning_rate=0.002")
    assert summarize("training.trial_completed", trial(3, "diverged").model_dump(mode="json"), None).startswith(
        "trial 3/3: diverged, 41.3s;")
    assert "cut off by the budget" in summarize("training.trial_completed", trial(3, "cut_off").model_dump(mode="json"), None)
    line = summarize("training.tuning_completed", tuned().model_dump(mode="json"), None)
    assert line == ("tuning: trial 2 of 3 run won, validation macro_f1 0.812 (recipe's own: 0.740); the trials took 124s "
                    "(budget 3 min); the budget fit no more trials; training the final model with epochs=5 "
                    "learning_rate=0.002")
    assert stage_status("training.trial_completed") == stage_status("training.tuning_completed") == "running"


def test_follow_prints_a_line_per_trial_then_the_winner():
    base = successful_run(RUN, progress_steps=0)
    head = [e for e in base if e.type in ("run.start", "ingest.committed", "prep.prepared")]
    tuning = [envelope(p, run_id=RUN, producer="trainer")
              for p in (trial(1, metric=0.74, is_best=True), trial(2, metric=0.812, is_best=True), trial(3, "diverged"),
                        tuned())]
    f, lines = RunFollow(RUN), []
    out = PlainOutput(lines.append)
    for i, env in enumerate(head + tuning):
        show(f, out, row_of(env.model_dump(mode="json"), i + 1))
    text = "\n".join(lines)
    for k in (1, 2, 3):
        assert text.count(f"trial {k}/3:") == 1, text
    assert text.count("tuning: trial 2 of 3 run won") == 1
    assert f.status == "running" and f.stage("trainer") == "running"
