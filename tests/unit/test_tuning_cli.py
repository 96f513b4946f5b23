"""`tuneline run --tune N --budget MINUTES --tune-space FIELD=[...]`: the plan's `tuning`, and bad values refused
at the prompt, one line naming the option each, nothing published."""

from __future__ import annotations

import pytest

from services.cli import main
from tests.unit.cli_support import run_cli

pytestmark = pytest.mark.usefixtures("cli_data_dir")

RUN = ["run", "--locator", "jsonl:x.jsonl", "--target", "ok"]


@pytest.fixture
def published(monkeypatch):
    sent = []

    async def keep(cmd, **kw):
        sent.append(cmd)
        return "run-x"

    monkeypatch.setattr(main, "publish_command", keep)
    return sent


def test_tune_budget_and_space_become_the_plans_tuning(published, capsys):
    code, _, err = run_cli(RUN + ["--tune", "4", "--budget", "3", "--tune-space", "learning_rate=[5e-4,1e-3]",
                                  "--no-wait"], capsys)
    assert code == 0, err
    assert published[0].plan.tuning.model_dump() == {"trials": 4, "budget_minutes": 3.0,
                                                      "space": {"learning_rate": [5e-4, 1e-3]}}


def test_no_tune_no_tuning_and_tune_alone_gets_the_default_budget(published, capsys):
    assert run_cli(RUN + ["--no-wait"], capsys)[0] == 0
    assert published[0].plan.tuning is None
    assert run_cli(RUN + ["--tune", "2", "--no-wait"], capsys)[0] == 0
    assert published[1].plan.tuning.budget_minutes == 30


@pytest.mark.parametrize("args, line", [
    (["--tune", "0"], "tuneline run: --tune: Input should be greater than or equal to 1"),
    (["--tune", "65"], "tuneline run: --tune: Input should be less than or equal to 64"),
    (["--tune", "2", "--budget", "0"], "tuneline run: --budget: Input should be greater than 0"),
    (["--budget", "5"], "tuneline run: --budget: applies with --tune N"),
    (["--tune-space", "epochs=[1]"], "tuneline run: --tune-space: applies with --tune N"),
    (["--tune", "2", "--tune-space", "seed=[1,2]"], "tuneline run: --tune-space seed: not a tunable field"),
    (["--tune", "2", "--tune-space", "epochs=3"], "tuneline run: --tune-space epochs: give the candidates as a non-empty JSON list"),
    (["--tune", "2", "--tune-space", "epochs=[]"], "tuneline run: --tune-space epochs: give the candidates as a non-empty JSON list"),
    (["--tune", "2", "--tune-space", "lora_r=[8,0]"], "tuneline run: --tune-space lora_r=0: Input should be greater than or equal to 1"),
    (["--tune", "2", "--validation-fraction", "0"], "tuneline run: --tune: Value error, tuning scores each trial on the validation split"),
    (["--tune", "2", "--backend", "openai"], "tuneline run: --tune: tuning runs local trainings"),
])
def test_bad_tuning_options_are_one_line_each_naming_the_option(published, capsys, args, line):
    code, _, err = run_cli(RUN + args + ["--no-wait"], capsys)
    assert code == 2 and not published
    assert any(got.startswith(line) for got in err.strip().splitlines()), err
