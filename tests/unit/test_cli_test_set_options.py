"""`tuneline run`'s options for the three splits (D14) reach the run's plan, and bad values are refused
naming the option."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.cli import main

RUN = ["run", "--locator", "jsonl:/tmp/x.jsonl", "--target", "support"]


def test_new_test_set_and_validation_fraction_go_into_the_plan():
    plan = main.build_start_run(main.parser().parse_args(RUN + ["--new-test-set", "--validation-fraction", "0"])).plan
    assert plan.new_test_set is True and plan.validation_fraction == 0
    plan = main.build_start_run(main.parser().parse_args(RUN)).plan
    assert plan.new_test_set is False and plan.validation_fraction == 0.1 and plan.eval_fraction == 0.2


def test_a_validation_fraction_out_of_range_names_its_option():
    with pytest.raises(ValidationError) as e:
        main.build_start_run(main.parser().parse_args(RUN + ["--validation-fraction", "1"]))
    assert [line.split(":")[1].strip() for line in main.validation_lines(e.value, "tuneline run", main.RUN_OPTIONS)] == [
        "--validation-fraction"]
