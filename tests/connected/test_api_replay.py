"""The replay verbs through the API (services/api/routes_replay.py) against a real stack: operator tokens only,
each replay recorded on the bus with the token's subject and the API as producer, refusals by reason code."""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from contracts import subjects
from tests.connected.test_api import api  # noqa: F401 (the fixture: a recorded stack, the API, a token per role)
from tests.connected.test_delivery import stream_messages

pytestmark = pytest.mark.connected


async def _recorded(js, etype):
    msgs = await stream_messages(js, subjects.STREAM, subjects.subject_for(etype, kind="event"))
    return [json.loads(m.data) for m in msgs]


async def test_an_operator_rebuilds_a_projection_and_the_store_and_each_replay_is_recorded(api):  # noqa: F811
    body = {"switch": False}
    assert (await api.post("/api/replay/projections/timeline", json=body)).status_code == 401
    assert (await api.post("/api/replay/projections/timeline", json=body,
                           headers=api.auth_as("viewer"))).status_code == 403
    assert (await api.post("/api/replay/projections/nothing", json=body,
                           headers=api.auth_as("operator"))).status_code == 422
    op = api.auth_as("operator")
    r = await api.post("/api/replay/projections/history", json=body, headers=op)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["outcome"] == "switched" and report["identical"] and report["version"] == 2
    assert report["to_position"] == len(api.envs)

    dsn = api.app.state.settings.database_url
    into = urlunsplit(urlsplit(dsn)._replace(path=f"/r_{uuid.uuid4().hex[:10]}"))
    r = await api.post("/api/replay/store", json={"into": into}, headers=op)
    assert r.status_code == 200, r.text
    store = r.json()
    assert store["outcome"] == "identical" and store["events"] >= len(api.envs)
    refused = await api.post("/api/replay/store", json={"into": dsn}, headers=op)
    assert refused.status_code == 422 and refused.json()["detail"]["reason_code"] == "audit.store_replay_refused"

    events = await _recorded(api.js, "projection.replayed") + await _recorded(api.js, "store.replayed")
    assert [(e["type"], e["producer"], e["payload"]["requested_by"]) for e in events] == [
        ("projection.replayed", "api", "operator-person"), ("store.replayed", "api", "operator-person")]


async def test_an_operator_re_runs_a_run_and_unknown_runs_and_consumers_are_refused(api):  # noqa: F811
    op = api.auth_as("operator")
    r = await api.post("/api/replay/runs/run-nobody", json={"from_stage": "evaluator"}, headers=op)
    assert r.status_code == 404 and r.json()["detail"]["reason_code"] == "audit.replay_run_not_found"
    r = await api.post("/api/replay/runs/run-bad", json={"from_stage": "evaluator"}, headers=op)
    assert r.status_code == 409 and r.json()["detail"]["reason_code"] == "audit.replay_stage_not_reached"
    r = await api.post("/api/replay/runs/run-ok", json={"from_stage": "evaluator", "new_run_id": "run-ok-2"},
                       headers=op)
    assert r.status_code == 202, r.text
    assert r.json()["run_id"] == "run-ok-2" and r.json()["trigger_type"] == "training.completed"
    replayed = await _recorded(api.js, "run.replayed")
    assert [(e["run_id"], e["producer"], e["payload"]["origin_run_id"], e["payload"]["requested_by"])
            for e in replayed] == [("run-ok-2", "api", "run-ok", "operator-person")]
    r = await api.post("/api/replay/consumers/evaluator-nope", json={"from": "1"}, headers=op)
    assert r.status_code == 404 and r.json()["detail"]["reason_code"] == "audit.replay_consumer_unknown"
    r = await api.post("/api/replay/consumers/evaluator-training-completed", json={"from": "soon"}, headers=op)
    assert r.status_code == 422 and r.json()["detail"]["reason_code"] == "audit.replay_position_invalid"
    # in place needs the live durable: no evaluator ever ran on this stack
    r = await api.post("/api/replay/consumers/evaluator-training-completed", json={"from": "1"}, headers=op)
    assert r.status_code == 404 and "does not exist on the server" in r.json()["detail"]["detail"]


async def test_under_per_service_nats_users_the_api_refuses_replays_it_may_not_carry_out_before_publishing(api):  # noqa: F811
    """The API's NATS user publishes commands only: re-running a run (a stage's trigger) and the serving view's
    buckets are refused by name, and no `run.replayed` is left standing alone on the bus."""
    from pydantic import SecretStr

    op = api.auth_as("operator")
    before = len(await _recorded(api.js, "run.replayed"))
    live = api.app.state.settings
    api.app.state.settings = live.model_copy(update={"nats_user": "api", "nats_password": SecretStr("not-used")})
    try:
        r = await api.post("/api/replay/runs/run-ok", json={"from_stage": "evaluator", "new_run_id": "run-ok-3"},
                           headers=op)
        assert r.status_code == 403 and r.json()["detail"]["reason_code"] == "audit.replay_publish_refused"
        assert "tuneline replay" in r.json()["detail"]["detail"]
        r = await api.post("/api/replay/projections/serving", json={"switch": False}, headers=op)
        assert r.status_code == 403 and r.json()["detail"]["reason_code"] == "audit.replay_publish_refused"
    finally:
        api.app.state.settings = live
    assert len(await _recorded(api.js, "run.replayed")) == before
