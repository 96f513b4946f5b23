"""A locator travels in events the audit log keeps for good: one carrying a password is refused when
the command is built or decoded, and the refusal does not repeat it."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from contracts.commands import DryRunIngest, IntrospectSource
from contracts.common import RunPlan
from contracts.registry import ContractError, decode, encode
from tests.factories import successful_run

SECRET = "hunter2"
BAD = [f"pg:postgresql://app:{SECRET}@db.internal:5432/crm?query=select%201",
       f"csv:https://bob:{SECRET}@files.example.com/x.csv",
       f"pg:host=db password={SECRET}?query=select 1"]


@pytest.mark.parametrize("locator", BAD)
def test_a_locator_with_credentials_is_refused_without_repeating_them(locator):
    for build in (lambda: RunPlan(locator=locator, target="t"), lambda: RunPlan(locator="jsonl:a.jsonl", target="t",
                                                                                eval_locator=locator),
                  lambda: IntrospectSource(locator=locator), lambda: DryRunIngest(locator=locator)):
        with pytest.raises(ValidationError) as err:
            build()
        assert all(SECRET not in e["msg"] for e in err.value.errors())


def test_locators_without_credentials_pass():
    for ok in ("pg:CRM_DSN?query=select text, label from tickets", "pg:CRM_DSN", "jsonl:data/a.jsonl",
               "csv:/srv/x.csv", "hf:org/name:train:v1.0"):
        assert RunPlan(locator=ok, target="t").locator == ok


def test_a_run_start_published_with_a_dsn_in_its_locator_is_refused_by_decode_without_the_password():
    start = successful_run("run-dsn")[0]
    body = json.loads(encode(start))
    body["payload"]["plan"]["locator"] = BAD[0]
    with pytest.raises(ContractError) as err:
        decode(json.dumps(body).encode())
    assert err.value.reason_code == "bus.invalid_payload" and SECRET not in str(err.value)


@pytest.mark.parametrize("locator", [f" pg:host=db password={SECRET} dbname=crm?query=select 1",
                                     f"pg :host=db password={SECRET}?query=select 1",
                                     f"csv:https://app:hun/ter2{SECRET}@files.example.com/x.csv"])
def test_credentials_behind_a_space_or_with_a_slash_in_the_password_are_refused_too(locator):
    with pytest.raises(ValidationError) as err:
        RunPlan(locator=locator, target="t")
    assert all(SECRET not in e["msg"] for e in err.value.errors())


def test_a_query_about_passwords_is_not_a_credential():
    assert RunPlan(locator="pg:CRM_DSN?query=select text, label from t where password_reset = true", target="t")
