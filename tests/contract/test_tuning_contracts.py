"""Plan v5 (`tuning`) and the tuning events: a v4 plan reads as a plan without tuning; the trial and tuning
events round-trip through the envelope; the plan's bounds name the field."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from contracts.common import RunPlan, TuningSettings
from contracts.envelope import Envelope
from contracts.events import TrialCompleted, TuningCompleted
from contracts.registry import decode, encode, registered_types
from tests.factories import envelope


@pytest.mark.parametrize("type_name", ["run.start", "ingest.commit", "prep.prepared", "preflight.passed",
                                       "training.started", "training.completed", "eval.completed", "export.completed"])
def test_every_plan_carrying_type_reads_a_v4_era_plan_as_one_without_tuning(type_name):
    mt = registered_types()[type_name]
    assert mt.upcasters[mt.version - 1]({"plan": {"locator": "jsonl:/x", "target": "t"}}) == {
        "plan": {"locator": "jsonl:/x", "target": "t"}}


def test_a_v4_run_start_decodes_with_no_tuning():
    body = {"event_id": str(uuid.uuid4()), "type": "run.start", "schema_version": 4, "run_id": "r",
            "correlation_id": "r", "producer": "cli", "payload": {"plan": {"locator": "jsonl:/x.jsonl", "target": "t"}}}
    _, cmd = decode(Envelope.model_validate(body).model_dump_json().encode())
    assert cmd.plan.tuning is None


def test_the_trial_and_tuning_events_round_trip():
    for payload in (TrialCompleted(trial=2, trials=4, settings={"learning_rate": 2e-3}, status="completed",
                                   metric_name="macro_f1", metric=0.8, best_step=10, steps=20, wall_s=12.5,
                                   train_rows=100, validation_rows=20, is_best=True),
                    TuningCompleted(trials_run=2, trials_planned=4, budget_minutes=3, stopped_by_budget=True,
                                    best_trial=2, best_settings={"learning_rate": 2e-3}, metric_name="macro_f1",
                                    best_metric=0.8, baseline_metric=0.7, wall_s=30, train_sha256="a" * 64,
                                    validation_sha256="b" * 64)):
        env = envelope(payload, run_id="r", producer="trainer")
        assert decode(encode(env))[1] == payload


@pytest.mark.parametrize("tuning, field", [
    ({"trials": 0, "budget_minutes": 1}, "trials"), ({"trials": 65, "budget_minutes": 1}, "trials"),
    ({"trials": 2, "budget_minutes": 0}, "budget_minutes"), ({"trials": 2, "budget_minutes": 1, "space": {"epochs": []}}, "space"),
])
def test_out_of_bounds_tuning_names_its_field(tuning, field):
    with pytest.raises(ValidationError) as err:
        RunPlan(locator="jsonl:/x", target="t", tuning=tuning)
    assert err.value.errors()[0]["loc"] == ("tuning", field)
    with pytest.raises(ValidationError, match="validation split"):
        RunPlan(locator="jsonl:/x", target="t", validation_fraction=0, tuning=TuningSettings(trials=2, budget_minutes=1))
