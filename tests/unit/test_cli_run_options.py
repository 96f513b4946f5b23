"""`tuneline run` checks its recipe, `--set` overrides and cleaning knobs before publishing anything:
one line per problem, exit 2, the valid names listed whole."""

from __future__ import annotations

import pytest

from contracts.common import CleaningSettings
from services.cli import main
from services.cli.run_options import recipe_problems, split_overrides, target_slug
from services.trainer.recipes import RECIPES, Recipe
from tests.unit.cli_support import run_cli

pytestmark = pytest.mark.usefixtures("cli_data_dir")

RUN = ["run", "--locator", "jsonl:x.jsonl", "--target", "ok"]


@pytest.fixture(autouse=True)
def nothing_is_published(monkeypatch):
    async def refuse(*a, **kw):
        raise AssertionError("published despite invalid options")

    monkeypatch.setattr(main, "publish_command", refuse)


def test_a_value_of_the_wrong_type_an_unknown_field_and_an_unknown_recipe_each_get_a_line(capsys):
    code, _, err = run_cli(RUN + ["--set", "epochs=abc", "--set", "nonsense=1", "--recipe", "nope"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("tuneline run: ") for line in lines)
    assert lines[0].startswith("tuneline run: --recipe: unknown recipe 'nope'; the recipes are: ")
    assert all(name in lines[0] for name in RECIPES)
    assert lines[1].startswith("tuneline run: --set epochs='abc': ") and "number" in lines[1]
    assert lines[2].startswith("tuneline run: --set nonsense: unknown recipe field")
    # the valid fields are listed whole, not cut off
    settable = sorted(set(Recipe.model_fields) - {"name", "task"})
    assert ", ".join(settable) in lines[2]
    assert "Traceback" not in err


def test_a_value_out_of_bounds_and_a_cross_field_conflict_are_refused():
    assert recipe_problems(None, {"lora_r": 0})[0].startswith("--set lora_r=0: ")
    assert recipe_problems("chat-sft-lora", {"pooling": "mean"}) == [
        "--set: recipe 'chat-sft-lora' with these overrides: Value error, pooling applies to classification heads; "
        "chat_sft has none"]
    assert recipe_problems("seqcls-lora-minilm", {"epochs": 3, "max_length": 256, "patience": None}) == []


def test_cleaning_knobs_are_checked_and_go_into_the_plan(capsys):
    code, _, err = run_cli(RUN + ["--set", "clean.near_dupp=false", "--set", "clean.quality_threshold=2"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("tuneline run: --set clean.near_dupp: unknown cleaning knob; the knobs are: ")
    assert all(f"clean.{f}" in lines[0] for f in CleaningSettings.model_fields)
    assert lines[1].startswith("tuneline run: --set clean.quality_threshold=2: ") and len(lines) == 2

    args = main.parser().parse_args(RUN + ["--set", "clean.near_dup=false", "--set", "epochs=2"])
    plan = main.build_start_run(args).plan
    assert plan.cleaning.near_dup is False and plan.recipe_overrides == {"epochs": 2}


def test_valid_options_are_published(monkeypatch, capsys):
    sent = []

    async def publish(cmd, **kw):
        sent.append(cmd)
        return "run-1"

    monkeypatch.setattr(main, "publish_command", publish)
    code, out, _ = run_cli(RUN + ["--recipe", "seqcls-lora-minilm", "--set", "epochs=3", "--no-wait"], capsys)
    assert code == 0 and sent[0].plan.recipe_overrides == {"epochs": 3}


def test_split_overrides_and_slug():
    assert split_overrides({"clean.near_dup": False, "epochs": 1}) == ({"epochs": 1}, {"near_dup": False})
    assert target_slug("Équipe Support / EU") == "equipe-support-eu"
    assert target_slug("日本") == "target"


@pytest.mark.parametrize("word, value", [("off", False), ("false", False), ("on", True), ("true", True)])
def test_length_outliers_is_a_cleaning_knob_in_words(word, value):
    args = main.parser().parse_args(RUN + ["--set", f"clean.length_outliers={word}"])
    assert main.run_option_problems(args) == []
    assert main.build_start_run(args).plan.cleaning.length_outliers is value


def test_min_per_class_goes_into_the_plan_and_bad_values_are_refused_at_the_prompt(capsys):
    args = main.parser().parse_args(RUN + ["--min-per-class", "3"])
    assert main.build_start_run(args).plan.cleaning.min_per_class == 3
    assert main.build_start_run(main.parser().parse_args(RUN)).plan.cleaning.min_per_class is None

    code, _, err = run_cli(RUN + ["--min-per-class", "1", "--set", "clean.length_outliers=maybe"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("tuneline run: --set clean.length_outliers='maybe': ") and "boolean" in lines[0]
    assert lines[1].startswith("tuneline run: --min-per-class 1: ") and "greater than or equal to 2" in lines[1]

    code, _, err = run_cli(RUN + ["--min-per-class", "3", "--set", "clean.min_per_class=4"], capsys)
    assert code == 2 and "disagree" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(RUN + ["--min-per-class", "two"], capsys)
    assert code == 2 and "--min-per-class" in err


def test_ingest_commit_takes_min_per_class(monkeypatch, capsys):
    sent = []

    async def publish(cmd, **kw):
        sent.append(cmd)
        return "run-1"

    monkeypatch.setattr(main, "publish_command", publish)
    monkeypatch.setattr(main, "follow_and_print", lambda run_id, timeout: 0)
    code, _, _ = run_cli(["ingest", "commit", "jsonl:x.jsonl", "--min-per-class", "2"], capsys)
    assert code == 0 and sent[0].plan.cleaning.min_per_class == 2
    code, _, err = run_cli(["ingest", "commit", "jsonl:x.jsonl", "--min-per-class", "0"], capsys)
    assert code == 2 and err.startswith("tuneline ingest commit: --min-per-class: ")
