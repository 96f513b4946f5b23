"""`tuneline follow` against a real nats-server: a run's events as they are published become its lines, a run
whose trigger waits on the trainer's durable consumer is QUEUED with its position, and `tuneline runs` says so too."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from contracts import subjects
from services.audit.db import connect_as_app
from services.cli.follow import PlainOutput, follow_bus, list_runs, mark_queued
from tests.conftest import wait_for
from tests.connected.test_audit import publish_all, start_audit, stop_audit
from tests.factories import successful_run
from tests.unit.test_cli_follow import RUN, a_run

pytestmark = pytest.mark.connected


async def test_follow_shows_a_published_run_once_and_ends_with_its_status(js):
    await publish_all(js, a_run())
    lines: list[str] = []
    followed = await follow_bus(js, RUN, PlainOutput(lines.append), start_seq=1, timeout=20)
    assert followed.status == "succeeded"
    stages = [line.split()[1:3] for line in lines if "succeeded" in line]
    assert stages == [["ingest", "succeeded"], ["prep", "succeeded"], ["trainer", "succeeded"],
                      ["evaluator", "succeeded"], ["export", "succeeded"], ["registry", "succeeded"]]
    assert len(lines) == len(set(lines))
    assert [line.split()[3] for line in lines if line.split()[2] == "step"] == ["10/30", "20/30", "30/30"]
    assert (await js.stream_info(subjects.STREAM)).state.consumer_count == 0  # its consumer went with it


async def test_a_run_behind_another_in_the_trainers_queue_is_queued_with_its_position(js, nats_server, database,
                                                                                       tmp_path):
    # the trainer's durable consumer, holding one run's trigger (training it) with another's stored after it
    await js.add_consumer(subjects.STREAM, ConsumerConfig(
        durable_name="trainer-prep-prepared", filter_subject=subjects.subject_for("prep.prepared", kind="event"),
        ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1))
    trainer = await js.pull_subscribe_bind("trainer-prep-prepared", subjects.STREAM)
    others = [e for r in ("run-first", "run-second") for e in successful_run(r, progress_steps=0)
              if e.type == "prep.prepared"]
    await publish_all(js, others[:1])
    taken = await trainer.fetch(1, timeout=5)  # in training: delivered, not acknowledged
    await publish_all(js, others[1:])
    ours = a_run()
    before_training = [e for e in ours if e.type in ("run.start", "ingest.committed", "prep.prepared")]
    await publish_all(js, before_training)

    lines: list[str] = []
    following = asyncio.create_task(follow_bus(js, RUN, PlainOutput(lines.append), start_seq=1, timeout=30,
                                               queue_every_s=0.2))
    await wait_for(lambda: any("QUEUED" in line for line in lines))
    queued = next(line for line in lines if "QUEUED" in line)
    assert queued.split()[1:3] == ["trainer", "QUEUED"]
    assert queued.endswith("2 runs ahead of it in the trainer's queue")  # the one in training, the one stored before

    # `tuneline runs` tells the same from the projection and the trainer's consumer
    svc = await start_audit(nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        n = len(others) + len(before_training)
        await wait_for(lambda: _entries(conn, n), timeout=20)
        runs = {r["run_id"]: r for r in await list_runs(conn)}
        await mark_queued(js, list(runs.values()))
    finally:
        await conn.close()
        await stop_audit(svc)
    assert (runs[RUN]["status"], runs[RUN]["queued_stage"], runs[RUN]["queued_ahead"]) == ("queued", "trainer", 2)
    assert (runs["run-second"]["status"], runs["run-second"]["queued_ahead"]) == ("queued", 1)
    assert runs["run-first"]["status"] == "running"  # delivered to the trainer

    await taken[0].ack()
    await publish_all(js, [e for e in ours if e not in before_training])
    followed = await asyncio.wait_for(following, 30)
    assert followed.status == "succeeded" and followed.queued is None
    assert sum("QUEUED" in line for line in lines) == 1
    assert any(line.split()[1:3] == ["trainer", "running"] for line in lines)


async def _entries(conn, n: int) -> bool:
    return await conn.fetchval("SELECT count(*) FROM timeline_entries") >= n


async def test_follow_of_a_run_with_no_events_gives_up_after_the_first_event_wait(js):
    await publish_all(js, successful_run("run-other", progress_steps=0)[:1])
    followed = await follow_bus(js, "run-nobody", PlainOutput(lambda _line: None), start_seq=1, timeout=30,
                                first_event_s=0.5)
    assert followed.rows == []
