"""`tuneline replay projection NAME` for History, failure clusters and the serving bucket against real PostgreSQL
and NATS (D8, D17): each rebuilt beside the live version from run_events, compared row by row (key by key for
the bucket), switched to only when identical or asked, the old version kept until dropped."""

from __future__ import annotations

import argparse
import asyncio
import json

import asyncpg
import nats
import pytest

from services.audit.db import connect_as_app
from services.audit.projections import history, timeline
from services.cli import main as cli
from services.cli.replay_projection_cmds import cmd_replay_projection
from services.common import serving
from services.common.bus import declare_streams
from services.common.registry_log import target_state
from tests.connected.test_history import T, _publish_subject, lifecycle

pytestmark = pytest.mark.connected

_COLUMNS = ("global_position", "event_id", "type", "schema_version", "run_id", "correlation_id", "causation_id",
            "occurred_at", "producer", "severity", "reason_code", "subject", "payload")


async def _record_and_project(database, nats_url, envs) -> None:
    """run_events as the recorder writes them (real subjects), the projectors caught up, and `serving` as the
    registry writes it (services/registry/serving.py) from the target's log."""
    from services.registry.serving import project

    rows = [(i + 1, e.event_id, e.type, e.schema_version, e.run_id, e.correlation_id, e.causation_id, e.occurred_at,
             e.producer, e.severity.value, e.reason_code, _publish_subject(e), json.dumps(e.payload))
            for i, e in enumerate(envs)]
    conn = await connect_as_app(database)
    nc = await nats.connect(nats_url)
    try:
        await conn.copy_records_to_table("run_events", records=rows, columns=_COLUMNS)
        await timeline.catch_up(conn)
        await history.catch_up(conn)
        js = nc.jetstream()
        await declare_streams(js)
        state, _ = await target_state(conn, T)
        await project(js, state)
    finally:
        await nc.close()
        await conn.close()


async def _sql(database, statement, *args, owner=False):
    conn = await (asyncpg.connect(database) if owner else connect_as_app(database))
    try:
        return await conn.fetchval(statement, *args)
    finally:
        await conn.close()


def _replay(capsys, projection, **kw) -> tuple[int, dict]:
    args = argparse.Namespace(projection=projection, switch=False, drop=None, actor="ops", json=True)
    for k, v in kw.items():
        setattr(args, k, v)
    rc = cmd_replay_projection(cli, args)
    out = capsys.readouterr().out
    return rc, json.loads(out[out.find("{\n"):])


@pytest.fixture
def recorded(database, nats_server, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    envs = lifecycle()
    asyncio.run(_record_and_project(database, nats_server.url, envs))
    return database, nats_server.url, len(envs)


def test_history_is_rebuilt_beside_the_live_version_and_a_drift_is_kept_aside(recorded, capsys):
    database, _, n = recorded
    rc, report = _replay(capsys, "history")
    assert rc == 0 and report["outcome"] == "switched" and report["to_position"] == n
    assert report["differences"] == {"history_runs": 0, "history_datasets": 0}
    # the live rows drift from what run_events says (a fold bug, say): the next version differs and waits
    asyncio.run(_sql(database, "UPDATE history_runs SET outcome = 'promoted' WHERE run_id = 'run-2'"))
    rc, report = _replay(capsys, "history")
    assert rc == 1 and report["outcome"] == "kept_aside" and report["differences"]["history_runs"] == 2
    assert asyncio.run(_sql(database, "SELECT outcome FROM history_runs WHERE run_id = 'run-2'")) == "promoted"
    assert asyncio.run(_sql(database, "SELECT outcome FROM history_v3.history_runs WHERE run_id = 'run-2'",
                            owner=True)) == "rejected"
    rc, report = _replay(capsys, "history", switch=True)
    assert rc == 1 and report["outcome"] == "switched" and report["forced"]
    assert asyncio.run(_sql(database, "SELECT outcome FROM history_runs WHERE run_id = 'run-2'")) == "rejected"


def test_failure_clusters_are_the_timeline_rebuilt_and_compared_as_clusters(recorded, capsys):
    database, _, _ = recorded
    rc, report = _replay(capsys, "failure_clusters")
    assert rc == 0 and report["projection"] == "timeline"
    assert report["differences"]["failure_clusters"] == 0
    # a failure entry lost its reason code in the live version: one cluster shrinks
    asyncio.run(_sql(database, "UPDATE timeline_entries SET reason_code = NULL WHERE reason_code = 'training.cancelled'"))
    rc, report = _replay(capsys, "failure_clusters")
    assert rc == 1 and report["outcome"] == "kept_aside"
    assert report["differences"]["failure_clusters"] == 1 and report["differences"]["timeline_entries"] == 2
    assert any("training.cancelled" in s for s in report["samples"]["failure_clusters"])


async def _kv(nats_url, fn):
    nc = await nats.connect(nats_url)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def test_the_serving_bucket_is_rebuilt_as_a_bucket_beside_it_and_switched_key_by_key(recorded, capsys):
    database, nats_url, _ = recorded
    live = asyncio.run(_kv(nats_url, lambda js: serving.read(js, T)))
    assert live["version"] == 3
    rc, report = _replay(capsys, "serving")
    assert rc == 0 and report["outcome"] == "switched" and report["differences"] == {"serving": 0}
    assert (report["live_version"], report["version"]) == (1, 2)

    # the bucket says v1 serves (a lost write, a hand edit): run_events says v3
    wrong = {**live, "version": 1}
    asyncio.run(_kv(nats_url, lambda js: _put(js, T, wrong)))
    rc, report = _replay(capsys, "serving")
    assert rc == 1 and report["outcome"] == "kept_aside" and report["differences"] == {"serving": 2}
    assert asyncio.run(_kv(nats_url, lambda js: serving.read(js, T)))["version"] == 1  # untouched
    kept = asyncio.run(_kv(nats_url, lambda js: _get(js, "serving_v3", T)))
    assert kept["version"] == 3  # the new version, aside in its own bucket
    rc, report = _replay(capsys, "serving", switch=True)
    assert rc == 1 and report["outcome"] == "switched" and report["version"] == 4
    assert asyncio.run(_kv(nats_url, lambda js: serving.read(js, T))) == live
    # the version it replaced stays until dropped; the live one cannot be dropped
    assert asyncio.run(_kv(nats_url, lambda js: _get(js, "serving_v2", T)))["version"] == 1
    base = argparse.Namespace(projection="serving", switch=False, actor="ops", json=False)
    assert cmd_replay_projection(cli, argparse.Namespace(**{**vars(base), "drop": 4})) == 2
    assert cmd_replay_projection(cli, argparse.Namespace(**{**vars(base), "drop": 2})) == 0
    buckets = asyncio.run(_kv(nats_url, _buckets))
    assert "serving_v2" not in buckets and "serving_v3" in buckets and "serving" in buckets


async def _put(js, key, value):
    kv = await serving.serving_bucket(js)
    await kv.put(key, json.dumps(value, sort_keys=True).encode())


async def _get(js, bucket, key):
    kv = await js.key_value(bucket)
    return json.loads((await kv.get(key)).value)


async def _buckets(js):
    from nats.js.errors import BucketNotFoundError

    out = set()
    for name in ("serving", "serving_v1", "serving_v2", "serving_v3", "serving_v4"):
        try:
            await js.key_value(name)
            out.add(name)
        except BucketNotFoundError:
            pass
    return out
