"""The timeline for issue 4's events: preflight verdicts, checkpoints, pause/resume, hosted jobs,
and control commands each get a line; a blocked preflight fails its run."""

from __future__ import annotations

from contracts.commands import CancelTraining, PauseTraining
from contracts.common import RunPlan
from contracts.envelope import Severity
from contracts.events import (
    CostEstimate,
    MemoryEstimate,
    Notice,
    PreflightBlocked,
    PreflightCheck,
    PreflightPassed,
    TrainingCheckpointed,
    TrainingCompleted,
    TrainingPaused,
    TrainingProgressed,
    TrainingStarted,
    TrainPlan,
)
from services.audit.projections.timeline import fold, stage_of, stage_status, summarize
from tests.factories import envelope, ref
from tests.unit.test_timeline_fold import as_rows

PLAN = RunPlan(locator="jsonl:/x.jsonl", target="t")
TRAIN_PLAN = TrainPlan(recipe="seqcls-lora-minilm", task="sequence_classification", backend="local", method="lora",
                       base_model="all-MiniLM-L6-v2", device="cpu", train_rows=160, eval_rows=40, steps=50, epochs=5,
                       eval_every_steps=10, checkpoint_every_steps=10, patience=2, settings={})


def line(payload, **kw) -> str:
    env = envelope(payload, run_id="r", **kw)
    return summarize(env.type, env.payload, env.reason_code)


def test_lines_for_training_events():
    mem = MemoryEstimate(device="cpu", weights=2**28, gradients=0, optimizer=0, activations=2**28, total=2**29,
                         available=8 * 2**30, fits=True)
    passed = line(PreflightPassed(plan=PLAN, train_plan=TRAIN_PLAN, checks=[], memory=mem,
                                  warnings=[Notice(reason_code="prep.few_rows_total", message="m")]))
    assert passed == ("preflight passed (strict): seqcls-lora-minilm on cpu, 50 steps, needs ~0.50 GiB of 8.0 "
                      "available; warnings: prep.few_rows_total")
    blocked = line(PreflightBlocked(plan=PLAN, checks=[PreflightCheck(name="memory", status="block", message="big")],
                                    blockers=[Notice(reason_code="preflight.memory_insufficient", message="big")]))
    assert blocked == "preflight blocked: [preflight.memory_insufficient] big"
    assert line(TrainingStarted(plan=PLAN, base_model="/x/all-MiniLM-L6-v2", max_steps=50, train_rows=160,
                                recipe="seqcls-lora-minilm", resumed_from_step=20)) == (
        "seqcls-lora-minilm: LoRA fine-tune of all-MiniLM-L6-v2 for 50 steps on 160 rows, resuming from step 20")
    cost = CostEstimate(model="gpt-4o-mini", training_tokens=1000, epochs=3, usd_per_1m_tokens=3.0, usd=0.01,
                        prices_as_of="2026-04")
    assert "job ftjob-1" in line(TrainingStarted(plan=PLAN, base_model="gpt-4o-mini", max_steps=0, train_rows=10,
                                                 backend="openai", hosted_job_id="ftjob-1", cost_estimate=cost))
    assert line(TrainingProgressed(step=7, loss=0.5, tokens=900)) == "step 7 loss 0.500 900 tokens"
    assert line(TrainingCheckpointed(step=10, metric_name="macro_f1", metric=0.8, is_best=True, checkpoint="c")) == (
        "checkpoint at step 10 macro_f1 0.800 (best so far)")
    assert line(TrainingPaused(step=12, requested_by="alice")) == "paused by alice at step 12"
    assert line(CancelTraining(requested_by="bob", reason="wrong data")) == "cancel requested by bob: wrong data"
    done = line(TrainingCompleted(plan=PLAN, base_model="m", adapter=ref("a"), manifest=ref("m"), eval=ref("e"),
                                  label_space=["a", "b"], steps=30, final_loss=0.1, examples_per_s=10.0, wall_s=3.0,
                                  best_step=20, best_metric=0.9, metric_name="macro_f1", stopped_early=True))
    assert done == ("trained 30 steps in 3.0s, final loss 0.100; best macro_f1 0.900 at step 20 (exported); "
                    "stopped early")


def test_preflight_belongs_to_the_trainer_and_blocked_fails_the_run():
    assert stage_of("preflight.blocked") == stage_of("training.started") == "trainer"
    assert stage_status("preflight.blocked") == "failed"
    assert stage_status("training.paused") == "paused"
    blocked = envelope(PreflightBlocked(plan=PLAN, checks=[], blockers=[Notice(reason_code="preflight.cuda_unavailable",
                                                                                message="no GPU")]),
                       run_id="r", severity=Severity.ERROR, reason_code="preflight.blocked")
    later = envelope(PauseTraining(requested_by="x"), run_id="r")
    b = fold(as_rows([blocked, later]))
    assert b.runs["r"].status == "failed" and b.runs["r"].reason_code == "preflight.blocked"
    assert b.stages[("r", "trainer")].status == "failed"


def test_a_memory_estimate_too_large_for_a_float_does_not_stop_the_projection():
    """Valid by the contract (bounded only below): dividing it by 2**30 raised OverflowError, and the
    timeline stopped at it for every run."""
    mem = MemoryEstimate(device="cpu", weights=1, gradients=0, optimizer=0, activations=1, total=10**400,
                         available=8 * 2**30, fits=False)
    b = fold(as_rows([envelope(PreflightPassed(plan=PLAN, train_plan=TRAIN_PLAN, checks=[], memory=mem), run_id="r")]))
    assert b.entries[0][-1].startswith(f"preflight passed (strict): seqcls-lora-minilm on cpu, 50 steps, needs ~{10**400 // 2**30}")
