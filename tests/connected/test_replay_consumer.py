"""`tuneline replay consumer` on a real stack: the evaluator's recorded traffic replayed into a sandbox (a
nats-server and a database of its own) emits what history says it emitted; a deliberately changed handler
shows its differences; in place, the durable is rewound and the live service takes the messages again
without a second effect (D3)."""

from __future__ import annotations

import argparse
import asyncio
import json

import nats
import pytest

from contracts import subjects
from tests.connected.test_delivery import stream_messages
from services.audit.db import connect_as_app
from services.cli import main as cli
from services.cli.replay_verbs import cmd_replay_consumer
from services.common.bus import publish
from services.evaluator import app as evaluator_app
from services.evaluator.settings import EvaluatorSettings
from tests.conftest import wait_for
from tests.connected.test_audit import start_audit, stop_audit
from tests.connected.test_evaluator_service import _completed, provider  # noqa: F401 (a fixture)

pytestmark = pytest.mark.connected

DURABLE = "evaluator-training-completed"


async def _types(database, run_id):
    conn = await connect_as_app(database)
    try:
        return [r[0] for r in await conn.fetch("SELECT type FROM run_events WHERE run_id = $1 ORDER BY global_position",
                                               run_id)]
    finally:
        await conn.close()


async def _recorded_traffic(nats_server, database, tmp_path, run_ids, *, keep_evaluator=False):
    """The evaluator and the recorder on the live stack; one training.completed per run, evaluated, recorded."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    audit = await start_audit(nats_server, database, tmp_path)
    svc = evaluator_app.build(EvaluatorSettings(nats_url=nats_server.url, data_dir=tmp_path / "data"))
    await svc.prepare_broker()
    await svc.broker.start()
    try:
        for run_id in run_ids:
            await publish(js, _completed(tmp_path, run_id), subjects.subject_for("training.completed", kind="event"))
        for run_id in run_ids:
            await wait_for(lambda r=run_id: _has(database, r, "eval.completed"), timeout=120)
    finally:
        if not keep_evaluator:
            await svc.broker.stop()
            await stop_audit(audit)
            await nc.close()
    return (svc, audit, nc) if keep_evaluator else None


async def _has(database, run_id, etype):
    return etype in await _types(database, run_id)


def _replay(capsys, **kw) -> tuple[int, dict]:
    args = argparse.Namespace(durable=DURABLE, start="1", sandbox=True, sandbox_db=None, settle=2.0, actor="ops",
                              json=True)
    for k, v in kw.items():
        setattr(args, k, v)
    rc = cmd_replay_consumer(cli, args)
    out = capsys.readouterr()
    at = out.out.find("{\n")
    assert at >= 0, out.err[-2000:]
    return rc, json.loads(out.out[at:])


@pytest.mark.slow  # the evaluator on a real stack, then in sandboxes: 30-60 s
def test_the_evaluator_replayed_in_a_sandbox_emits_what_history_recorded_and_a_changed_handler_differs(
        nats_server, database, tmp_path, monkeypatch, capsys, provider):  # noqa: F811
    asyncio.run(_recorded_traffic(nats_server, database, tmp_path, ["run-r1", "run-r2"]))
    live_before = asyncio.run(_types(database, "run-r1"))
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    monkeypatch.setenv("TUNELINE_DATA_DIR", str(tmp_path / "data"))

    rc, report = _replay(capsys)
    assert rc == 0 and report["outcome"] == "identical", json.dumps(report, indent=1)
    assert report["inputs"] == 2 and report["outputs"] == 6  # judge.validated, eval.gate_decided, eval.completed each
    assert report["differences"] == {"only_recorded": 0, "only_replayed": 0, "changed": 0}
    assert asyncio.run(_types(database, "run-r1")) == live_before  # nothing live was written

    # a changed evaluator: it reports the candidate's accuracy halved
    real = evaluator_app._summary

    def halved(report):
        s = real(report)
        return s.model_copy(update={"accuracy": s.accuracy / 2})

    monkeypatch.setattr(evaluator_app, "_summary", halved)
    rc, report = _replay(capsys)
    assert rc == 1 and report["outcome"] == "differs"
    assert report["differences"] == {"only_recorded": 0, "only_replayed": 0, "changed": 2}
    assert all("eval.completed" in s and "accuracy" in s for s in report["samples"])

    # from a later position only the second run is replayed
    conn_first = asyncio.run(_first_position(database, "run-r2"))
    monkeypatch.setattr(evaluator_app, "_summary", real)
    rc, report = _replay(capsys, start=str(conn_first))
    assert rc == 0 and report["inputs"] == 1 and report["outputs"] == 3

    events = asyncio.run(_events_of(nats_server.url, "consumer.replayed"))
    assert [(e["payload"]["outcome"], e["reason_code"]) for e in events] == [
        ("identical", None), ("differs", "audit.consumer_outputs_differ"), ("identical", None)]


async def _first_position(database, run_id):
    conn = await connect_as_app(database)
    try:
        return await conn.fetchval("SELECT min(global_position) FROM run_events WHERE run_id = $1", run_id)
    finally:
        await conn.close()


async def _events_of(url, etype):
    nc = await nats.connect(url)
    try:
        msgs = await stream_messages(nc.jetstream(), subjects.STREAM, subjects.subject_for(etype, kind="event"))
        return [json.loads(m.data) for m in msgs]
    finally:
        await nc.close()


def test_unknown_consumers_and_positions_are_refused_by_name(capsys, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://x@127.0.0.1:1/x")
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
    base = dict(sandbox=True, sandbox_db=None, settle=1.0, actor="ops", json=True)
    assert cmd_replay_consumer(cli, argparse.Namespace(durable="evaluator-nope", start="1", **base)) == 2
    assert "[audit.replay_consumer_unknown]" in capsys.readouterr().err
    assert cmd_replay_consumer(cli, argparse.Namespace(durable=DURABLE, start="yesterday", **base)) == 2
    assert "[audit.replay_position_invalid]" in capsys.readouterr().err


@pytest.mark.slow  # the evaluator on a real stack, then in sandboxes: 30-60 s
def test_rewound_in_place_the_running_evaluator_takes_its_messages_again_without_a_second_effect(
        nats_server, database, tmp_path, monkeypatch, capsys, provider):  # noqa: F811
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)

    async def scenario():
        svc, audit, nc = await _recorded_traffic(nats_server, database, tmp_path, ["run-p1"], keep_evaluator=True)
        js = nc.jetstream()
        try:
            before = await _types(database, "run-p1")
            asked = len(provider.bodies)
            # the CLI runs its own loops: in a thread, while this loop keeps the services going
            rc = await asyncio.to_thread(cmd_replay_consumer, cli, argparse.Namespace(
                durable=DURABLE, start="1", sandbox=False, sandbox_db=None, settle=1.0, actor="ops", json=True))
            assert rc == 0
            # the evaluator scored the run again (the fake provider was asked again) ...
            await wait_for(lambda: len(provider.bodies) >= 2 * asked, timeout=60)

            async def settled():
                c = await js.consumer_info(subjects.STREAM, DURABLE)
                return c.num_pending == 0 and c.num_ack_pending == 0 and c.delivered.stream_seq >= 1
            await wait_for(settled, timeout=60)
            await asyncio.sleep(1.0)
            # ... and what it emitted again was deduplicated: the run's history did not grow
            assert await _types(database, "run-p1") == before
        finally:
            await svc.broker.stop()
            await stop_audit(audit)
            await nc.close()

    asyncio.run(scenario())
    out = capsys.readouterr().out
    report = json.loads(out[out.find("{\n"):])
    assert report["mode"] == "in_place" and report["outcome"] == "redriven" and report["inputs"] == 1
