"""The hash chain over run_events (D19) against real NATS and PostgreSQL: the recorder links every row in
position order (across batches, holes and restarts), `tuneline audit verify` finds an edit the owner made
with the triggers disabled, the migrator hashes rows recorded before the chain, and values jsonb respells
hash the same after the round trip."""

from __future__ import annotations

import argparse
import asyncio
import json

import asyncpg
import pytest

from contracts import subjects
from contracts.registry import encode
from services.audit import chain
from services.audit.app import AuditService
from services.audit.db import connect_as_app
from services.audit.migrate import migrate
from services.audit.recorder import Recorder
from services.audit.settings import AuditSettings
from services.common.bus import publish
from tests.conftest import wait_for
from tests.factories import failed_run, successful_run

pytestmark = pytest.mark.connected


def subject_of(env):
    kind = "command" if env.type == "run.start" else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


async def publish_all(js, envs):
    for env in envs:
        await publish(js, env, subject_of(env))


async def _recorded(conn, n):
    return await conn.fetchval("SELECT count(*) FROM run_events") >= n


async def _record_with_service(nats_server, database, tmp_path, n, **kw):
    svc = AuditService(AuditSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "d",
                                     projector_poll_s=0.1, **kw))
    await svc.prepare_broker()
    await svc.broker.start()
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _recorded(conn, n), timeout=30)
    finally:
        await conn.close()
        await svc._shutdown()
        await svc.broker.stop()


async def _verify(database, start=1):
    conn = await connect_as_app(database)
    try:
        return await chain.verify(conn, start)
    finally:
        await conn.close()


async def test_every_recorded_row_is_linked_in_position_order_across_batches_and_restarts(
        js, nats_server, database, tmp_path):
    first = successful_run("run-1") + failed_run("run-2")
    await publish_all(js, first)
    await _record_with_service(nats_server, database, tmp_path, len(first), recorder_batch=4)
    later = successful_run("run-3")
    await publish_all(js, later)
    # a new recorder reads the chain's head from the database and goes on from it
    await _record_with_service(nats_server, database, tmp_path, len(first) + len(later), recorder_batch=5)
    result = await _verify(database)
    assert result.broken is None and result.checked == len(first) + len(later)
    conn = await connect_as_app(database)
    try:
        rows = await conn.fetch("SELECT global_position, prev_hash, hash FROM run_events ORDER BY global_position")
        head = await chain.head(conn)
    finally:
        await conn.close()
    assert rows[0]["prev_hash"] == chain.GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(rows, rows[1:]))
    assert head == chain.ChainHead(rows[-1]["global_position"], rows[-1]["hash"])
    assert (await _verify(database, start=7)).checked == len(rows) - 6


async def test_messages_above_a_hole_wait_for_it_and_the_chain_stays_in_position_order(js, nats_server, database,
                                                                                          tmp_path):
    """A dead recorder held the first messages; its successor gets the later ones first. Appending those
    at once would link them past the hole, and the late rows could not be linked in position order."""
    from tests.connected.test_audit import start_after_a_dead_recorder

    envs, svc = await start_after_a_dead_recorder(js, nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        await asyncio.sleep(0.5)
        assert await conn.fetchval("SELECT count(*) FROM run_events") == 0  # held above the hole, not appended
        await wait_for(lambda: _recorded(conn, len(envs)), timeout=30)
    finally:
        await conn.close()
        await svc._shutdown()
        await svc.broker.stop()
    result = await _verify(database)
    assert result.broken is None and result.checked == len(envs)


async def _tamper(database, statement: str) -> None:
    owner = await asyncpg.connect(database)
    try:
        async with owner.transaction():
            await owner.execute("ALTER TABLE run_events DISABLE TRIGGER USER")
            await owner.execute(statement)
            await owner.execute("ALTER TABLE run_events ENABLE TRIGGER USER")
    finally:
        await owner.close()


@pytest.mark.parametrize(("statement", "position", "kind"), [
    ("UPDATE run_events SET payload = jsonb_set(payload, '{rows_read}', '9999') WHERE global_position = 2", 2, "content"),
    ("UPDATE run_events SET occurred_at = occurred_at - interval '1 day' WHERE global_position = 4", 4, "content"),
    ("DELETE FROM run_events WHERE global_position = 3", 4, "link"),
])
def test_verify_finds_a_row_the_owner_edited_with_the_triggers_disabled(nats_server, database, tmp_path,
                                                                         monkeypatch, capsys, statement, position,
                                                                         kind):
    from services.cli import audit_cmds
    from services.cli import main as cli

    envs = successful_run("run-t")
    asyncio.run(_publish_and_record(nats_server, database, tmp_path, envs))  # the CLI runs loops of its own
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    assert audit_cmds.cmd_anchor(cli, argparse.Namespace(json=False)) == 0
    anchor = capsys.readouterr().out.strip()
    assert audit_cmds.cmd_verify(cli, argparse.Namespace(start=1, anchor=anchor, json=False)) == 0
    assert "chain intact" in capsys.readouterr().out
    asyncio.run(_tamper(database, statement))
    assert audit_cmds.cmd_verify(cli, argparse.Namespace(start=1, anchor=None, json=True)) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["break"]["position"] == position and report["break"]["kind"] == kind
    assert report["checked"] == position - 1 - (kind == "link")
    # verifying from after the edit finds the rest intact: the break is located, not smeared
    assert audit_cmds.cmd_verify(cli, argparse.Namespace(start=position + 1, anchor=anchor, json=False)) == 0


async def _publish_and_record(nats_server, database, tmp_path, envs):
    import nats

    from services.common.bus import declare_streams

    nc = await nats.connect(nats_server.url)
    try:
        jsc = nc.jetstream()
        await declare_streams(jsc)
        for env in envs:
            await publish(jsc, env, subject_of(env))
    finally:
        await nc.close()
    await _record_with_service(nats_server, database, tmp_path, len(envs))


async def test_the_migrator_hashes_rows_recorded_before_the_chain_and_the_recorder_goes_on_from_them(
        js, nats_server, database, tmp_path):
    old = successful_run("run-old")
    owner = await asyncpg.connect(database)
    try:
        # rows as a recorder older than the chain wrote them: no hashes
        await owner.copy_records_to_table("run_events", records=[
            (i + 1, e.event_id, e.type, e.schema_version, e.run_id, e.correlation_id, e.causation_id, e.occurred_at,
             e.producer, e.severity.value, e.reason_code, subject_of(e), json.dumps(e.payload))
            for i, e in enumerate(old)], columns=("global_position", "event_id", "type", "schema_version", "run_id",
                                                  "correlation_id", "causation_id", "occurred_at", "producer",
                                                  "severity", "reason_code", "subject", "payload"))
        assert (await _verify(database)).broken.kind == "unhashed"
        await migrate(database)
        assert await owner.fetchval("SELECT count(*) FROM run_events WHERE hash IS NULL") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the triggers are back
            await owner.execute("UPDATE run_events SET type = 'x' WHERE global_position = 1")
    finally:
        await owner.close()
    await publish_all(js, old)  # the same events on the bus: positions 1..n, already recorded
    await publish_all(js, failed_run("run-new"))
    await _record_with_service(nats_server, database, tmp_path, len(old) + len(failed_run("run-new")))
    result = await _verify(database)
    assert result.broken is None and result.checked == len(old) + len(failed_run("run-new"))


async def test_values_jsonb_respells_hash_the_same_after_the_round_trip(js, database):
    progress = successful_run("run-num", progress_steps=1)[4]
    assert progress.type == "training.progress"
    body = json.loads(encode(progress))
    body["payload"].update(loss=-0.0, learning_rate=1e20, eta_s=1.5e300, examples_per_s=1e-7, eval_loss=12345.0)
    await js.publish(subject_of(progress), json.dumps(body).encode(), headers={"Nats-Msg-Id": "numbers"})
    big = successful_run("run-big", progress_steps=1)[4]
    body = json.loads(encode(big))
    body["payload"]["tokens"] = 2**70  # beyond 64 bits: the slow path, json's writer
    await js.publish(subject_of(big), json.dumps(body).encode(), headers={"Nats-Msg-Id": "big"})
    pool = await asyncpg.create_pool(database, server_settings={"role": "tuneline_app"})
    try:
        sub = await js.pull_subscribe(f"{subjects.ROOT}.>", durable="numbers", stream=subjects.STREAM)
        out = await Recorder(pool, js).record(await sub.fetch(2, timeout=5))
        assert out.appended == 2
    finally:
        await pool.close()
    result = await _verify(database)
    assert result.broken is None and result.checked == 2


def test_canonical_payload_is_what_jsonb_reads_back():
    assert chain.canonical_payload({"b": 1, "a": -0.0}) == b'{"a":0.0,"b":1}'
    assert chain.canonical_payload({"x": 1e16}) == chain.canonical_payload({"x": 10**16})
    assert chain.canonical_payload({"x": 1e23}) == chain.canonical_payload({"x": 10**23})  # the decimal, not the binary
    assert chain.canonical_payload({"x": [2**70]}) == b'{"x":[1180591620717411303424]}'
    assert chain.canonical_payload({"x": -0.05}) == b'{"x":-0.05}'
