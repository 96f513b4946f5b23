"""`tuneline replay store --into URL` on a real stack: run_events rebuilt from the JetStream stream into a fresh
database by the recorder's code agrees with the live store position by position (event ids, hashes, skipped
positions), and a difference injected into the live store is found and fails the command."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from urllib.parse import urlsplit, urlunsplit

import nats
import pytest

from contracts import subjects
from tests.connected.test_delivery import stream_messages
from services.cli import main as cli
from services.cli.replay_verbs import cmd_replay_store
from services.common.bus import declare_streams, publish
from tests.connected.test_audit_chain import _record_with_service, _tamper, subject_of
from tests.factories import failed_run, successful_run

pytestmark = pytest.mark.connected


async def _publish(url, envs, raw=()):
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await declare_streams(js)
        for env in envs:
            await publish(js, env, subject_of(env))
        for subject, data in raw:  # what the recorder dead-letters: not JSON
            await js.publish(subject, data)
    finally:
        await nc.close()


async def _events_of(url, etype):
    nc = await nats.connect(url)
    try:
        msgs = await stream_messages(nc.jetstream(), subjects.STREAM, subjects.subject_for(etype, kind="event"))
        return [json.loads(m.data) for m in msgs]
    finally:
        await nc.close()


def _into(database: str) -> str:
    """Another (not yet created) database on the same server."""
    parts = urlsplit(database)
    return urlunsplit(parts._replace(path=f"/r_{uuid.uuid4().hex[:10]}"))


def _replay(capsys, into) -> tuple[int, dict]:
    rc = cmd_replay_store(cli, argparse.Namespace(into=into, actor="ops", json=True))
    out = capsys.readouterr().out
    return rc, json.loads(out[out.find("{\n"):])


def test_the_store_rebuilt_from_the_stream_agrees_with_the_live_one_and_an_edit_is_found(
        nats_server, database, tmp_path, monkeypatch, capsys):
    envs = successful_run("run-s") + failed_run("run-f")
    asyncio.run(_publish(nats_server.url, envs, raw=[("tuneline.evt.prep.cleaned", b"not json")]))
    # the recorder dead-letters the poison, and records the bus.message_dead_lettered it publishes for it
    asyncio.run(_record_with_service(nats_server, database, tmp_path, len(envs) + 1))
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)

    rc, report = _replay(capsys, _into(database))
    assert rc == 0 and report["outcome"] == "identical", report
    # every position of the stream (the dead-lettered one as a skipped position) was compared, hashes included
    assert report["events"] == len(envs) + 1 and report["skipped"] == 1 and report["hashes_compared"]
    assert (report["compared_from"], report["compared_to"]) == (1, len(envs) + 2)
    assert sum(report["differences"].values()) == 0
    assert report["into"].rsplit("/", 1)[1].startswith("r_") and "postgres:" not in report["into"]  # no credentials

    # the live store edited by its owner with the triggers off: the row's hash no longer matches the bus's
    asyncio.run(_tamper(database, "UPDATE run_events SET event_id = gen_random_uuid() WHERE global_position = 3"))
    rc, report = _replay(capsys, _into(database))
    assert rc == 1 and report["outcome"] == "differs"
    assert report["differences"]["event_id"] == 1 and sum(report["differences"].values()) == 1
    assert any("position 3" in s for s in report["samples"])

    recorded = asyncio.run(_events_of(nats_server.url, "store.replayed"))
    assert [(e["payload"]["outcome"], e["reason_code"], e["payload"]["requested_by"]) for e in recorded] == [
        ("identical", None, "ops"), ("differs", "audit.store_differs", "ops")]


def test_rebuilding_into_the_live_database_or_one_holding_events_is_refused(nats_server, database, tmp_path,
                                                                           monkeypatch, capsys):
    asyncio.run(_publish(nats_server.url, failed_run("run-x")))
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    assert cmd_replay_store(cli, argparse.Namespace(into=database, actor="ops", json=True)) == 2
    assert "[audit.store_replay_refused]" in capsys.readouterr().err
    into = _into(database)
    rc, report = _replay(capsys, into)  # the live recorder recorded nothing yet: all of the stream is its lag
    assert rc == 0 and report["events"] == 2 and report["live_settled"] == 0 and report["compared_to"] == 0
    assert cmd_replay_store(cli, argparse.Namespace(into=into, actor="ops", json=True)) == 2
    assert "already holds events" in capsys.readouterr().err
