"""`tuneline replay projection timeline` against real PostgreSQL and NATS (D8): version N+1 is built from
run_events beside N, compared row by row, switched to only when identical or asked, N kept until dropped,
and every replay recorded on the bus as projection.replayed."""

from __future__ import annotations

import argparse
import asyncio
import json

import asyncpg
import nats
import pytest

from contracts import subjects
from services.audit.db import connect_as_app
from services.audit.projections import timeline
from services.cli import main as cli
from services.cli.replay_projection_cmds import cmd_replay_projection
from tests.factories import failed_run, successful_run

pytestmark = pytest.mark.connected

_COLUMNS = ("global_position", "event_id", "type", "schema_version", "run_id", "correlation_id", "causation_id",
            "occurred_at", "producer", "severity", "reason_code", "subject", "payload")


def _rows(envs, first: int):
    return [(first + i, e.event_id, e.type, e.schema_version, e.run_id, e.correlation_id, e.causation_id, e.occurred_at,
             e.producer, e.severity.value, e.reason_code, "tuneline.evt.x", json.dumps(e.payload))
            for i, e in enumerate(envs)]


async def _record_and_project(database, envs, first: int = 1) -> None:
    conn = await connect_as_app(database)
    try:
        await conn.copy_records_to_table("run_events", records=_rows(envs, first), columns=_COLUMNS)
        await timeline.catch_up(conn)
    finally:
        await conn.close()


async def _as_app(database, fn):
    conn = await connect_as_app(database)
    try:
        return await fn(conn)
    finally:
        await conn.close()


def _replay(capsys, **kw) -> tuple[int, dict]:
    args = argparse.Namespace(projection="timeline", switch=False, drop=None, actor="alice", json=True)
    for k, v in kw.items():
        setattr(args, k, v)
    rc = cmd_replay_projection(cli, args)
    out = capsys.readouterr().out
    at = out.find("{\n")  # the report (log lines may come before it)
    assert at >= 0, out
    return rc, json.loads(out[at:])


async def _replayed_events(url):
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(subjects.STREAM, seq)
            if msg.subject == subjects.subject_for("projection.replayed", kind="event"):
                out.append(json.loads(msg.data))
        return out
    finally:
        await nc.close()


@pytest.fixture
def stack(database, nats_server, monkeypatch):
    from services.common.bus import declare_streams

    async def declare():
        nc = await nats.connect(nats_server.url)
        await declare_streams(nc.jetstream())
        await nc.close()

    asyncio.run(declare())
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    return database, nats_server.url


def test_an_identical_rebuild_becomes_the_live_version_and_the_old_one_stays_until_dropped(stack, capsys):
    database, nats_url = stack
    first = successful_run("run-a") + failed_run("run-b")
    asyncio.run(_record_and_project(database, first))
    before = asyncio.run(_as_app(database, timeline.snapshot))
    rc, report = _replay(capsys)
    assert rc == 0 and report["outcome"] == "switched" and report["identical"]
    assert (report["live_version"], report["version"], report["to_position"]) == (1, 2, len(first))
    assert report["events"] == len(first) and report["differences"] == {
        "timeline_runs": 0, "timeline_stages": 0, "timeline_entries": 0}
    # readers see v2 (the same rows); the live projector goes on from the same position, on the new tables
    assert asyncio.run(_as_app(database, timeline.snapshot)) == before
    later = successful_run("run-c")
    asyncio.run(_record_and_project(database, later, first=len(first) + 1))
    assert asyncio.run(_as_app(database, lambda c: timeline.run_timeline(c, "run-c")))["run"]["status"] == "succeeded"

    async def state(conn):
        versions = {r["version"]: r["state"] for r in await conn.fetch(
            "SELECT version, state FROM projection_versions WHERE projection = 'timeline'")}
        kept = await conn.fetchval("SELECT count(*) FROM timeline_v1.timeline_entries")
        return versions, kept

    owner_state = asyncio.run(_owner(database, state))
    assert owner_state == ({1: "retired", 2: "live"}, len(first))  # v1 kept, as it was
    assert cmd_replay_projection(cli, argparse.Namespace(projection="timeline", switch=False, drop=2, actor="a",
                                                         json=False)) == 2  # the live version
    assert cmd_replay_projection(cli, argparse.Namespace(projection="timeline", switch=False, drop=1, actor="a",
                                                         json=False)) == 0
    capsys.readouterr()
    assert asyncio.run(_owner(database, lambda c: c.fetchval(
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'timeline_v1'"))) == 0
    events = asyncio.run(_replayed_events(nats_url))
    assert [(e["payload"]["requested_by"], e["payload"]["outcome"], e["payload"]["to_position"]) for e in events] == [
        ("alice", "switched", len(first))]
    assert events[0]["producer"] == "cli" and events[0]["severity"] == "info"


async def _owner(database, fn):
    conn = await asyncpg.connect(database)
    try:
        return await fn(conn)
    finally:
        await conn.close()


def test_a_rebuild_that_differs_is_kept_aside_until_switch_is_asked(stack, capsys):
    database, nats_url = stack
    envs = successful_run("run-a") + failed_run("run-b")
    asyncio.run(_record_and_project(database, envs))
    # the live projection drifted (a bug in the code that folded it, say)
    asyncio.run(_as_app(database, lambda c: c.execute(
        "UPDATE timeline_runs SET status = 'succeeded', reason_code = NULL, failure = NULL WHERE run_id = 'run-b'")))
    rc, report = _replay(capsys)
    assert rc == 1 and report["outcome"] == "kept_aside" and not report["identical"]
    assert report["differences"]["timeline_runs"] == 2 and report["differences"]["timeline_entries"] == 0
    assert any("run-b" in s for s in report["samples"]["timeline_runs"])
    status = lambda c: c.fetchval("SELECT status FROM timeline_runs WHERE run_id = 'run-b'")  # noqa: E731
    assert asyncio.run(_as_app(database, status)) == "succeeded"  # readers still on v1
    rc, report = _replay(capsys, switch=True)
    assert rc == 1 and report["outcome"] == "switched" and report["forced"] and report["version"] == 3
    assert asyncio.run(_as_app(database, status)) == "failed"  # v3, rebuilt from run_events, is what readers see
    events = asyncio.run(_replayed_events(nats_url))
    assert [(e["payload"]["outcome"], e["reason_code"]) for e in events] == [
        ("kept_aside", "audit.projection_differs"), ("switched", "audit.projection_differs")]
