"""The search behind `--tune N --budget MINUTES` (services/trainer/tuning.py): the space is the recipe's,
relative to its values; trials are planned deterministically, the recipe's own settings first; the
budget stops trials that would not fit; a diverged trial does not end the search; trials a previous
attempt recorded are reported again, not retrained. The search runs the real local engine on a tiny BERT."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.trainer import tuning
from services.trainer.recipes import resolve_recipe
from services.trainer.tuning import (
    TrialResult,
    TuningError,
    cost_units,
    estimate_s,
    fits,
    plan_trials,
    run_search,
    save_trial,
    search_space,
    settings_of,
)


def minilm_recipe(**kw):
    return resolve_recipe("seqcls-lora-minilm", "single_label_classification", {"seed": 13, **kw})


# --- the space ------------------------------------------------------------------------------------


def test_the_default_space_is_relative_to_the_recipe_and_holds_its_own_values():
    recipe = minilm_recipe()
    space = search_space(recipe)
    assert {"learning_rate", "epochs"} <= set(space)
    for name, values in space.items():
        assert getattr(recipe, name) in values, name
        assert len(values) == len(set(values)) > 1
    assert space["learning_rate"] == [recipe.learning_rate / 2, recipe.learning_rate, recipe.learning_rate * 2]
    # another recipe value moves the space with it
    assert search_space(minilm_recipe(learning_rate=4e-3))["learning_rate"] == [2e-3, 4e-3, 8e-3]


def test_fields_the_plan_set_are_held_unless_the_tuning_space_names_them():
    recipe = minilm_recipe(learning_rate=4e-3)
    assert "learning_rate" not in search_space(recipe, fixed={"learning_rate"})
    space = search_space(recipe, {"learning_rate": [1e-3, 4e-3]}, fixed={"learning_rate"})
    assert space["learning_rate"] == [1e-3, 4e-3]
    # a given space is the whole space, and may name a field outside the default one
    assert search_space(recipe, {"batch_size": [8, 16]}) == {"batch_size": [8, 16]}


def test_an_untunable_field_or_a_refused_value_is_a_named_tuning_invalid_error():
    with pytest.raises(TuningError, match="base_model cannot be tuned") as err:
        search_space(minilm_recipe(), {"base_model": ["x"]})
    assert err.value.reason_code == "training.tuning_invalid"
    with pytest.raises(TuningError, match="learning_rate"):
        search_space(minilm_recipe(), {"learning_rate": [1e-3, -1.0]})
    with pytest.raises(TuningError, match="no candidate values for epochs"):
        search_space(minilm_recipe(), {"epochs": []})


def test_the_trainer_refuses_a_plans_space_with_a_registered_reason_before_training():
    from contracts.common import RunPlan, TuningSettings
    from contracts.reason_codes import is_registered
    from services.common.delivery import StageError
    from services.trainer.tune_runner import planned_trials

    def plan(space, **kw):
        return RunPlan(locator="jsonl:/x.jsonl", target="t", tuning=TuningSettings(trials=3, budget_minutes=1, space=space),
                       **kw)

    for bad, code, said in ((plan({"lora_r": [8, 0]}), "training.tuning_invalid", "lora_r"),
                            (plan({"base_model": ["x"]}), "training.tuning_invalid", "base_model cannot be tuned"),
                            (plan({}, backend="openai"), "training.capability_unsupported", "not tuned")):
        with pytest.raises(StageError, match=said) as err:
            planned_trials(bad, minilm_recipe())
        assert err.value.reason_code == code and is_registered(code)
    # a field the plan sets is held: the default space leaves it alone
    trials = planned_trials(plan({}, learning_rate=4e-3), minilm_recipe(learning_rate=4e-3))
    assert all("learning_rate" not in t for t in trials)
    assert len(trials) == 3


def test_lora_alpha_follows_a_tuned_rank():
    recipe = minilm_recipe()
    assert recipe.lora_alpha == 2 * recipe.lora_r
    tuned = settings_of(recipe, {"lora_r": 16})
    assert (tuned.lora_r, tuned.lora_alpha) == (16, 32)


def test_trials_are_deterministic_distinct_and_start_with_the_recipes_own_settings():
    recipe = minilm_recipe()
    space = search_space(recipe)
    trials = plan_trials(recipe, space, 6, seed=13)
    assert trials == plan_trials(recipe, space, 6, seed=13)
    assert trials[0] == {name: getattr(recipe, name) for name in space}
    assert len(trials) == 6 and len({json.dumps(t, sort_keys=True) for t in trials}) == 6
    assert trials[1:] != plan_trials(recipe, space, 6, seed=14)[1:]
    # a grid smaller than N: every point once
    small = {"learning_rate": [1e-3, 2e-3]}
    assert len(plan_trials(recipe, small, 10, seed=1)) == 2


# --- the budget -----------------------------------------------------------------------------------


def test_the_estimate_scales_the_seconds_per_unit_measured_so_far():
    assert estimate_s([], 100.0) is None
    assert estimate_s([(100.0, 10.0)], 200.0) == pytest.approx(20.0)
    assert estimate_s([(100.0, 10.0), (300.0, 50.0)], 100.0) == pytest.approx(15.0)  # 60 s over 400 units


def test_a_trial_starts_only_when_its_estimate_fits_what_is_left():
    assert fits(100.0, 80.0, 180.0)
    assert not fits(100.0, 81.0, 180.0)
    assert fits(10.0, None, 180.0) and not fits(180.0, None, 180.0)


def test_cost_units_grow_with_epochs_and_length():
    recipe = minilm_recipe()
    base = cost_units(recipe, 400)
    assert cost_units(settings_of(recipe, {"epochs": recipe.epochs * 2}), 400) == pytest.approx(2 * base, rel=0.05)
    assert cost_units(settings_of(recipe, {"max_length": recipe.max_length * 2}), 400) == pytest.approx(2 * base)


# --- the search, on the real engine ----------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from services.trainer.local.engine import Control, train  # noqa: E402
from services.trainer.local.tasks import SequenceClassification  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, sentiment_rows  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def split() -> tuple[list[dict], list[dict]]:
    texts, labels = sentiment_rows()
    rows = [{"row_number": i + 1, "text": t, "label": lab} for i, (t, lab) in enumerate(zip(texts, labels))]
    return rows[::2], rows[1::2]


def tiny_recipe(base: str, **kw):
    params = dict(base_model=base, batch_size=20, learning_rate=1e-2, max_length=16, seed=2, epochs=4,
                  eval_every_steps=2, patience=None, warmup_ratio=0.0, max_grad_norm=1e6)
    return resolve_recipe("seqcls-lora-minilm", "single_label_classification", {**params, **kw})


def search(recipe, planned, work_dir, budget_s, trained: list, published: list):
    fit, val = split()

    async def train_trial(k, trial_recipe, control):
        trained.append(k)
        return await asyncio.to_thread(train, SequenceClassification(LABEL_SPACE), trial_recipe, fit, val,
                                       tuning.trial_work_dir(work_dir, k), work_dir / f"adapter-{k}", control=control)

    async def on_trial(result, is_best):
        published.append((result, is_best))

    return asyncio.run(run_search(recipe, planned, train_rows=len(fit), budget_s=budget_s, work_dir=work_dir,
                                  control=Control(), train_trial=train_trial, on_trial=on_trial))


@pytest.mark.slow  # three trainings of a tiny BERT: ~25 s on a busy 2-core machine
def test_the_best_validation_score_wins_and_a_diverged_trial_does_not_end_the_search(tiny_bert, tmp_path):
    recipe = tiny_recipe(tiny_bert)
    planned = plan_trials(recipe, search_space(recipe, {"learning_rate": [1e-2, 10.0, 3e-2]}, fixed={"learning_rate"}),
                          3, seed=2)
    assert [t["learning_rate"] for t in planned][0] == 1e-2
    trained, published = [], []
    out = search(recipe, planned, tmp_path, 3600, trained, published)
    assert trained == [1, 2, 3] and [r.trial for r, _ in published] == [1, 2, 3]
    by_lr = {r.settings["learning_rate"]: r for r in out.trials}
    assert by_lr[10.0].status == "diverged" and by_lr[10.0].metric is None
    assert by_lr[10.0].reason_code == "training.diverged"
    scored = [r for r in out.trials if r.metric is not None]
    assert len(scored) == 2 and all(r.metric_name == "macro_f1" for r in scored)
    assert out.best.metric == max(r.metric for r in scored)
    assert out.best.trial == min(r.trial for r in scored if r.metric == out.best.metric)  # ties: the earlier
    assert [is_best for r, is_best in published if r.trial == out.best.trial] == [True]
    assert not out.stopped_by_budget
    # every finished trial is on disk for a redelivery
    assert sorted(p.name for p in (tmp_path / "trials").glob("*.json")) == ["trial-001.json", "trial-002.json",
                                                                             "trial-003.json"]


def test_the_budget_stops_trials_that_would_not_fit_but_never_the_first(tiny_bert, tmp_path):
    recipe = tiny_recipe(tiny_bert)
    planned = plan_trials(recipe, {"learning_rate": [1e-2, 2e-2, 3e-2]}, 3, seed=2)
    trained, published = [], []
    out = search(recipe, planned, tmp_path, 0.001, trained, published)
    assert trained == [1] and out.stopped_by_budget
    assert out.best.trial == 1 and out.trials[0].status == "completed"


def test_a_trial_that_outruns_the_budget_is_cut_off_and_the_search_stops(tiny_bert, tmp_path):
    recipe = tiny_recipe(tiny_bert)
    planned = plan_trials(recipe, {"learning_rate": [1e-2, 2e-2, 3e-2]}, 3, seed=2)
    # a previous attempt recorded trial 1 as very cheap: trial 2 is expected to fit in what is left (it does not)
    save_trial(tmp_path, TrialResult(trial=1, settings=planned[0], status="completed", wall_s=0.001, units=1e12,
                                     metric_name="macro_f1", metric=0.5, best_step=5, steps=10))
    trained, published = [], []
    out = search(recipe, planned, tmp_path, 0.002, trained, published)
    assert trained == [2]
    assert [r.status for r in out.trials] == ["completed", "cut_off"]
    assert out.trials[1].reason_code == "training.timeout" and out.stopped_by_budget
    assert out.best.trial == 1


@pytest.mark.slow  # three trainings of a tiny BERT: ~25 s on a busy 2-core machine
def test_a_redelivery_reports_the_recorded_trials_again_and_trains_only_the_rest(tiny_bert, tmp_path):
    recipe = tiny_recipe(tiny_bert)
    planned = plan_trials(recipe, {"learning_rate": [1e-2, 2e-2]}, 2, seed=2)
    first, published = [], []
    done = search(recipe, planned, tmp_path, 3600, first, published)
    (tmp_path / "trials" / "trial-002.json").unlink()  # the attempt died before recording trial 2
    again, republished = [], []
    redone = search(recipe, planned, tmp_path, 3600, again, republished)
    assert first == [1, 2] and again == [2]
    assert republished[0][0] == published[0][0]  # trial 1 as recorded, wall time and all
    assert [r.metric for r in redone.trials] == [r.metric for r in done.trials]  # seeded: the same score again
    # a recorded trial whose settings are no longer the planned ones is not reused
    other = plan_trials(recipe, {"learning_rate": [1e-2, 5e-2]}, 2, seed=2)
    assert set(tuning.load_trials(tmp_path, other)) == {1}
