"""What `tuneline run` / `tuneline follow RUN` print for a run's events (services/cli/follow.py): a line per stage
transition, training progress, then a short summary; `tuneline runs`' table; and `tuneline timeline`'s stages."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from contracts.envelope import Severity
from contracts.events import (
    GateDecided,
    TrainingCheckpointed,
    TrainingCompleted,
    TrainingProgressed,
    TrainingStarted,
)
from services.cli import follow, main
from services.cli.follow import PlainOutput, Queued, RunFollow, row_of, runs_text, show
from services.cli.render import timeline_text
from tests.factories import envelope, failed_run, plan, ref, successful_run

RUN = "run-follow"


def rows_of(envelopes, start: int = 1) -> list[dict]:
    return [row_of(e.model_dump(mode="json"), start + i) for i, e in enumerate(envelopes)]


def fake_bus(rows: list[dict]):
    """follow._follow, with the run's events coming from a list instead of the bus."""
    async def _follow(_main, run_id, _timeout, out):
        f = RunFollow(run_id)
        for r in rows:
            show(f, out, r)
            if f.finished:
                break
        return f
    return _follow


def followed(monkeypatch, capsys, rows: list[dict], run_id: str = RUN) -> tuple[int, str]:
    monkeypatch.setattr(follow, "_follow", fake_bus(rows))
    code = main.follow_and_print(run_id, 60)
    return code, capsys.readouterr().out


def training(run_id: str = RUN, *, steps: int = 30, max_steps: int = 30, stopped_early: bool = False,
             eval_losses=(0.431,)) -> list:
    """A run's training events: started, progress every 10 steps, a checkpoint per evaluation, completed."""
    p = plan()
    out = [envelope(TrainingStarted(plan=p, base_model="/m/all-MiniLM-L6-v2", max_steps=max_steps, train_rows=160),
                    run_id=run_id, producer="trainer")]
    last_eval = None
    for i, step in enumerate(range(10, steps + 1, 10)):
        if i < len(eval_losses):
            last_eval = eval_losses[i]
            out.append(envelope(TrainingCheckpointed(step=step, max_steps=max_steps, metric_name="macro_f1", metric=0.8,
                                                     eval_loss=last_eval, is_best=True, checkpoint="c"),
                                run_id=run_id, producer="trainer"))
        out.append(envelope(TrainingProgressed(step=step, max_steps=max_steps, loss=1.0 / (i + 1),
                                               eval_loss=last_eval), run_id=run_id, producer="trainer"))
    out.append(envelope(TrainingCompleted(plan=p, base_model="/m", adapter=ref("a"), manifest=ref("m"), eval=ref("e"),
                                          label_space=["a", "b"], steps=steps, final_loss=0.2, examples_per_s=50.0,
                                          wall_s=9.5, best_step=10, best_metric=0.8, metric_name="macro_f1",
                                          stopped_early=stopped_early), run_id=run_id, producer="trainer"))
    return out


def a_run(**kw) -> list:
    """successful_run's events with the training above in place of its own."""
    base = successful_run(RUN, progress_steps=0)
    before = [e for e in base if e.type in ("run.start", "ingest.committed", "prep.prepared")]
    after = [e for e in base if e.type in ("eval.completed", "export.completed", "registry.version_registered")]
    return before + training(**kw) + after


def test_a_followed_run_prints_each_event_once_and_no_timeline_after_it(monkeypatch, capsys):
    code, out = followed(monkeypatch, capsys, rows_of(a_run()))
    assert code == 0
    assert "status=SUCCEEDED" in out
    for said in ("read 210 rows", "split 160 train / 40 eval", "LoRA fine-tune of all-MiniLM-L6-v2 for 30 steps",
                 "trained 30 steps", "candidate accuracy 0.900", "exported 1 files", "registered support-intents v1"):
        assert out.count(said) == 1, (said, out)  # today's output printed the whole timeline again after the stream
    assert "  events" not in out
    assert "`tuneline timeline run-follow` has every event" in out


def test_the_last_eval_loss_is_printed_once_per_evaluation_not_on_every_progress_line(monkeypatch, capsys):
    _, out = followed(monkeypatch, capsys, rows_of(a_run(eval_losses=(0.431,))))
    progress = [line for line in out.splitlines() if " step " in line and "/30" in line]
    assert len(progress) == 3  # steps 10, 20, 30: plain lines, stdout not being a terminal
    assert out.count("eval loss 0.431") == 1  # the evaluation at step 10, and not again at steps 20 and 30
    assert all("eval loss" not in line for line in progress)


def test_a_new_evaluation_loss_that_no_checkpoint_showed_is_printed_once():
    f, lines = RunFollow(RUN), []
    out = PlainOutput(lines.append)
    for r in rows_of([envelope(TrainingProgressed(step=s, max_steps=3, loss=0.5, eval_loss=0.7), run_id=RUN)
                      for s in (1, 2, 3)]):
        show(f, out, r)
    assert sum("eval loss 0.700" in line for line in lines) == 1


def test_an_evaluation_reported_by_progress_before_its_checkpoint_shows_its_loss_once():
    """The local engine publishes a step's progress (with the new eval loss) before that step's checkpoint."""
    f, lines = RunFollow(RUN), []
    out = PlainOutput(lines.append)
    envs = [envelope(TrainingProgressed(step=8, max_steps=30, loss=1.2, eval_loss=1.204), run_id=RUN),
            envelope(TrainingCheckpointed(step=8, metric_name="macro_f1", metric=0.681, eval_loss=1.204, is_best=True,
                                          checkpoint="c"), run_id=RUN),
            envelope(TrainingProgressed(step=10, max_steps=30, loss=1.1, eval_loss=1.204), run_id=RUN)]
    for r in rows_of(envs):
        show(f, out, r)
    assert sum("eval loss 1.204" in line for line in lines) == 1
    assert any("step 8: macro_f1 0.681" in line for line in lines)


def test_a_run_that_trained_its_full_schedule_is_not_said_to_have_stopped_early(monkeypatch, capsys):
    # the engine flags stopped_early when patience runs out at the schedule's last evaluation
    _, out = followed(monkeypatch, capsys, rows_of(a_run(steps=30, max_steps=30, stopped_early=True)))
    assert "stopped early" not in out
    assert "trained 30 steps in 9.5s, final loss 0.200; best macro_f1 0.800 at step 10 (exported)\n" in out


def test_a_run_that_stopped_before_its_schedule_says_where():
    f = RunFollow(RUN)
    for r in rows_of(a_run(steps=20, max_steps=30, stopped_early=True)):
        f.see(r)
    done = next(r for r in f.rows if r["type"] == "training.completed")
    assert f.training_done(done["payload"]).endswith("stopped early at step 20 of 30 (no better evaluation within "
                                                     "its patience)")


def test_a_stage_still_running_has_no_time_taken_in_the_timeline():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    tl = {"run": {"run_id": RUN, "target": "t", "status": "running", "locator": "jsonl:/x", "reason_code": None,
                  "failure": None, "started_at": t0},
          "stages": [{"stage": "ingest", "status": "succeeded", "started_at": t0 + timedelta(seconds=1),
                      "ended_at": t0 + timedelta(seconds=1), "detail": "read 10 rows"},
                     {"stage": "trainer", "status": "running", "started_at": t0 + timedelta(seconds=1.1),
                      "ended_at": None, "detail": "step 3/30"}],
          "entries": []}
    lines = timeline_text(tl).splitlines()
    ingest = next(line for line in lines if line.startswith("  ingest "))
    trainer = next(line for line in lines if line.startswith("  trainer "))
    assert "1.0s" in ingest
    assert "0.1s" not in trainer and "s  step 3/30" not in trainer  # today: "0.1s", the wait before it started
    assert trainer.split()[:3] == ["trainer", "running", "-"]


def test_a_run_waiting_for_the_trainer_is_queued_with_its_position_not_running():
    f = RunFollow(RUN)
    base = successful_run(RUN, progress_steps=0)
    rows = rows_of([e for e in base if e.type in ("run.start", "ingest.committed", "prep.prepared")])
    for r in rows:
        f.see(r)
    assert f.waiting_on() == ("trainer", "trainer-prep-prepared", rows[-1]["global_position"])
    at = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    lines = f.set_queue(Queued("trainer", 2), at)
    assert lines == ["  12:00:00   trainer   QUEUED     2 runs ahead of it in the trainer's queue"]
    assert f.set_queue(Queued("trainer", 2), at) == []  # a line when the position changes only
    assert f.status == "queued"
    assert "status=QUEUED (2 runs ahead of it in the trainer's queue)" in f.summary(at)[0]
    f.see(row_of(training()[0].model_dump(mode="json"), 10))  # the trainer took it
    assert f.status == "running" and f.waiting_on() is None


def test_a_failed_run_names_its_failure_and_exits_1(monkeypatch, capsys):
    code, out = followed(monkeypatch, capsys, rows_of(failed_run(RUN)))
    assert code == 1
    assert "status=FAILED" in out and "ingest.source_not_found" in out


def test_ctrl_c_says_the_run_goes_on_and_how_to_re_attach_without_a_traceback(monkeypatch, capsys):
    async def interrupted(*_a):
        raise KeyboardInterrupt

    monkeypatch.setattr(follow, "_follow", interrupted)
    code = main.follow_and_print(RUN, 60)
    out = capsys.readouterr().out
    assert code == 130
    assert "the run goes on" in out and f"`tuneline follow {RUN}` re-attaches" in out


def test_a_run_still_going_at_the_timeout_says_how_to_re_attach(monkeypatch, capsys):
    rows = rows_of(a_run())[:5]
    code, out = followed(monkeypatch, capsys, rows)
    assert code == 1 and "status=RUNNING" in out and f"`tuneline follow {RUN}` re-attaches" in out


def test_the_gate_decision_in_words_closes_the_output(monkeypatch, capsys):
    envs = a_run()
    gate = envelope(GateDecided(target="support-intents", passed=True, failed=[], candidate="c", baseline="classical",
                                baseline_kind="classical", records=ref("records"), test_set_sha256="0" * 64,
                                judge_id="j",
                                evidence={"candidate_mean": 0.9, "baseline_mean": 0.8, "delta": 0.1, "p_value": 0.01,
                                          "n": 40}),
                    run_id=RUN, severity=Severity.INFO)
    envs.insert(-3, gate)
    _, out = followed(monkeypatch, capsys, rows_of(envs))
    assert "gate passed (candidate 0.900 vs classical 0.800" in out and "(tuneline eval show run-follow)" in out
    assert out.count("gate passed") == 1
    assert "artifacts: " in out


def test_runs_are_listed_newest_first_with_queued_ones_and_their_position():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    runs = [
        {"run_id": "run-b", "target": "t", "status": "queued", "queued_stage": "trainer", "queued_ahead": 1,
         "started_at": t0 + timedelta(minutes=1), "updated_at": t0 + timedelta(minutes=1), "reason_code": None},
        {"run_id": "run-a", "target": "t", "status": "failed", "started_at": t0,
         "updated_at": t0 + timedelta(seconds=3), "reason_code": "ingest.source_not_found"},
    ]
    lines = runs_text(runs).splitlines()
    assert lines[1].split()[:2] == ["run-b", "QUEUED"] and "1 run ahead of it in the trainer's queue" in lines[1]
    assert lines[2].split()[:2] == ["run-a", "FAILED"] and "3.0s" in lines[2] and "ingest.source_not_found" in lines[2]
