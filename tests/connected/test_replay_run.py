"""`tuneline replay run RUN_ID --from STAGE` on a real stack: a recorded run re-evaluated as a new run with the
same inputs (the trigger's payload as recorded), the origin named in run.replayed, the origin run untouched;
and the refusals by name."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from services.audit.db import connect_as_app
from services.cli import main as cli
from services.cli.replay_verbs import cmd_replay_run
from tests.conftest import wait_for
from tests.connected.test_audit import stop_audit
from tests.connected.test_evaluator_service import provider  # noqa: F401 (a fixture)
from tests.connected.test_replay_consumer import _recorded_traffic, _types

pytestmark = pytest.mark.connected


async def _events(database, run_id):
    conn = await connect_as_app(database)
    try:
        return [dict(r) for r in await conn.fetch(
            "SELECT event_id, type, causation_id, producer, payload::text AS payload FROM run_events "
            "WHERE run_id = $1 ORDER BY global_position", run_id)]
    finally:
        await conn.close()


def _args(**kw):
    return argparse.Namespace(**{"run_id": "run-o", "stage": "evaluator", "new_run_id": None, "actor": "ops",
                                 "json": True, **kw})


@pytest.mark.slow  # the evaluator scores two runs on a real stack: ~30 s
def test_a_run_re_evaluated_from_its_recorded_trigger_is_a_new_run_naming_its_origin(
        nats_server, database, tmp_path, monkeypatch, capsys, provider):  # noqa: F811
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)

    async def scenario():
        svc, audit, nc = await _recorded_traffic(nats_server, database, tmp_path, ["run-o"], keep_evaluator=True)
        try:
            origin = await _events(database, "run-o")
            rc = await asyncio.to_thread(cmd_replay_run, cli, _args(new_run_id="run-again"))
            assert rc == 0
            await wait_for(lambda: _has_completed(database, "run-again"), timeout=120)
            assert await _events(database, "run-o") == origin  # the origin run is untouched
            return origin, await _events(database, "run-again")
        finally:
            await svc.broker.stop()
            await stop_audit(audit)
            await nc.close()

    origin, again = asyncio.run(scenario())
    out = capsys.readouterr().out
    started = json.loads(out[out.find("{\n"):])
    assert started["run_id"] == "run-again" and started["origin_run_id"] == "run-o"
    types = [e["type"] for e in again]
    assert types[:2] == ["run.replayed", "training.completed"] and "eval.completed" in types
    replayed = json.loads(again[0]["payload"])
    trigger = next(e for e in origin if e["type"] == "training.completed")
    assert replayed == {"origin_run_id": "run-o", "from_stage": "evaluator", "trigger_event_id": str(trigger["event_id"]),
                        "trigger_type": "training.completed", "requested_by": "ops"}
    # the same inputs: the trigger's payload as recorded, caused by run.replayed, under a new id
    assert json.loads(again[1]["payload"]) == json.loads(trigger["payload"])
    assert again[1]["causation_id"] == again[0]["event_id"] and again[1]["event_id"] != trigger["event_id"]
    # the stage ran again: new derived ids, the same verdict on the same inputs
    done_origin = json.loads(next(e for e in origin if e["type"] == "eval.completed")["payload"])
    done_again = json.loads(next(e for e in again if e["type"] == "eval.completed")["payload"])
    assert done_again["candidate"] == done_origin["candidate"] and done_again["gate_passed"] == done_origin["gate_passed"]
    assert not {e["event_id"] for e in again} & {e["event_id"] for e in origin}


async def _has_completed(database, run_id):
    return "eval.completed" in await _types(database, run_id)


def test_re_running_an_unknown_run_or_a_stage_it_never_reached_is_refused(nats_server, database, monkeypatch,
                                                                          capsys):
    from tests.connected.test_replay_projection import _record_and_project
    from tests.factories import failed_run

    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    asyncio.run(_record_and_project(database, failed_run("run-o")))  # failed at ingest
    assert cmd_replay_run(cli, _args(run_id="run-nobody")) == 2
    assert "[audit.replay_run_not_found]" in capsys.readouterr().err
    assert cmd_replay_run(cli, _args(stage="evaluator")) == 2
    err = capsys.readouterr().err
    assert "[audit.replay_stage_not_reached]" in err and "training.completed" in err
    assert cmd_replay_run(cli, _args(stage="ingest", new_run_id="run-o")) == 2  # the new id must be new
    assert "exists already" in capsys.readouterr().err


def test_a_user_who_may_not_publish_the_stage_s_events_gets_a_named_refusal(nats_server, database):
    """The API's NATS user publishes commands and replay records only (services/common/nats_auth.py): the
    re-issued training.completed is refused by the server, and the replay says so by name."""
    from services.audit import replay_run
    from services.common.nats_auth import with_credentials
    from tests.connected.test_replay_projection import _record_and_project
    from tests.factories import successful_run

    asyncio.run(_declare(nats_server.url))
    asyncio.run(_record_and_project(database, successful_run("run-o")))
    as_api = with_credentials(nats_server.url, "api", nats_server.passwords["api"])
    with pytest.raises(replay_run.RunReplayRefused) as refused:
        asyncio.run(replay_run.rerun(as_api, database, "run-o", "evaluator", actor="ops", producer="api"))
    assert refused.value.reason_code == "audit.replay_publish_refused"


async def _declare(url):
    import nats

    from services.common.bus import declare_streams

    nc = await nats.connect(url)
    try:
        await declare_streams(nc.jetstream())
    finally:
        await nc.close()
