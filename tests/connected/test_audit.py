"""The audit spine against real NATS and PostgreSQL: recorder idempotency, append-only storage,
projection rebuild equality."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from contracts import subjects
from contracts.registry import encode
from services.audit.app import AuditService
from services.audit.db import connect_as_app
from services.audit.projections import timeline
from services.audit.recorder import UNSTORABLE_REASON, Recorder, find_gaps, recorder_lag
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


async def start_after_a_dead_recorder(js, nats_server, database, tmp_path):
    """A recorder pulls the first 3 messages of two runs and dies before acking them; the rest are published
    and a new audit service starts: (the runs' envelopes, the service)."""
    from nats.js.api import AckPolicy

    from services.audit.recorder import CONSUMER
    from services.common.app import consumer_config

    settings = AuditSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "d",
                             projector_poll_s=0.1, ack_wait_s=2)
    config = consumer_config(settings)
    config.durable_name, config.filter_subject = CONSUMER, f"{subjects.ROOT}.>"
    config.ack_policy, config.max_ack_pending = AckPolicy.ALL, settings.recorder_batch * 4
    await js.add_consumer(subjects.STREAM, config)
    envs = successful_run("run-held") + failed_run("run-after-kill")
    await publish_all(js, envs[:3])
    dead = await js.pull_subscribe_bind(durable=CONSUMER, stream=subjects.STREAM)
    assert len(await dead.fetch(3, timeout=5)) == 3  # pulled by a recorder that dies before acking
    await publish_all(js, envs[3:])
    svc = AuditService(settings)
    await svc.prepare_broker()
    await svc.broker.start()
    return envs, svc


async def start_audit(nats_server, database, tmp_path, **kw):
    svc = AuditService(AuditSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "d",
                                     projector_poll_s=0.1, **kw))
    await svc.prepare_broker()
    await svc.broker.start()
    return svc


async def stop_audit(svc):
    await svc._shutdown()
    await svc.broker.stop()


async def count(conn, table):
    return await conn.fetchval(f"SELECT count(*) FROM {table}")


async def test_recorder_appends_every_event_at_its_stream_position_and_projects_the_timeline(js, nats_server, database, tmp_path):
    envs = successful_run("run-ok") + failed_run("run-bad")
    await publish_all(js, envs)
    svc = await start_audit(nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _checkpoint_at(conn, len(envs)))
        rows = await conn.fetch("SELECT global_position, event_id FROM run_events ORDER BY global_position")
        assert [r["global_position"] for r in rows] == list(range(1, len(envs) + 1))
        assert [r["event_id"] for r in rows] == [e.event_id for e in envs]
        assert await find_gaps(conn) == []
        assert (await recorder_lag(conn, js, subjects.STREAM))["lag"] == 0
        ok = await timeline.run_timeline(conn, "run-ok")
        bad = await timeline.run_timeline(conn, "run-bad")
    finally:
        await conn.close()
        await stop_audit(svc)
    assert ok["run"]["status"] == "succeeded" and ok["run"]["target"] == "support-intents"
    assert {s["stage"]: s["status"] for s in ok["stages"]} == {
        "ingest": "succeeded", "prep": "succeeded", "trainer": "succeeded", "evaluator": "succeeded",
        "export": "succeeded", "registry": "succeeded",
    }
    assert [e["type"] for e in ok["entries"]] == [e.type for e in envs if e.run_id == "run-ok"]
    assert bad["run"]["status"] == "failed" and bad["run"]["reason_code"] == "ingest.source_not_found"
    assert bad["stages"][0]["stage"] == "ingest" and bad["stages"][0]["status"] == "failed"


async def _checkpoint_at(conn, position):
    return await conn.fetchval("SELECT position FROM projection_checkpoints WHERE projection='timeline'") == position


async def test_recording_the_same_messages_again_changes_nothing(js, nats_server, database, tmp_path):
    envs = successful_run("run-a")
    await publish_all(js, envs)
    pool = await asyncpg.create_pool(database, server_settings={"role": "tuneline_app"})
    sub = await js.pull_subscribe(f"{subjects.ROOT}.>", durable="replay", stream=subjects.STREAM)
    msgs = await sub.fetch(len(envs), timeout=5)
    recorder = Recorder(pool, js)
    first = await recorder.record(msgs)
    again = await recorder.record(msgs)  # a redelivered batch: the recorder crashed before its ack
    async with pool.acquire() as conn:
        n = await count(conn, "run_events")
    await pool.close()
    assert (first.appended, first.already_recorded) == (len(envs), 0)
    assert (again.appended, again.already_recorded) == (0, len(envs))
    assert n == len(envs)


async def test_republished_duplicate_is_accounted_and_a_conflicting_event_id_is_dead_lettered(js, nats_server, database, tmp_path):
    envs = successful_run("run-d")[:2]
    await publish_all(js, envs)
    # Outside the dedup window the bus stores the same event again (simulated with another msg id) ...
    await js.publish(subject_of(envs[0]), encode(envs[0]), headers={"Nats-Msg-Id": "late-republish"})
    # ... and a different event reusing a recorded id must be refused, not overwrite history.
    impostor = failed_run("run-other")[1].model_copy(update={"event_id": envs[1].event_id})
    await js.publish(subject_of(impostor), encode(impostor), headers={"Nats-Msg-Id": "impostor"})
    svc = await start_audit(nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _skipped(conn, 2))
        skipped = await conn.fetch("SELECT global_position, reason_code FROM run_event_skipped_positions ORDER BY 1")
        dead = await wait_for(lambda: _dead_letters(js))
        await wait_for(lambda: _checkpoint_at(conn, 5))  # the dead-letter announcement is recorded too
        types = [r["type"] for r in await conn.fetch("SELECT type FROM run_events ORDER BY global_position")]
        assert types == ["run.start", "ingest.committed", "bus.message_dead_lettered"]
        assert await find_gaps(conn) == []
    finally:
        await conn.close()
        await stop_audit(svc)
    assert [(r["global_position"], r["reason_code"]) for r in skipped] == [
        (3, "audit.duplicate_event"), (4, "audit.event_id_conflict")]
    assert dead[0].headers["Tuneline-Reason-Code"] == "audit.event_id_conflict"


async def _skipped(conn, n):
    return await count(conn, "run_event_skipped_positions") >= n


async def _dead_letters(js):
    info = await js.stream_info(subjects.DLQ_STREAM)
    return [await js.get_msg(subjects.DLQ_STREAM, s) for s in range(1, info.state.last_seq + 1)] if info.state.messages else None


async def test_malformed_message_on_the_bus_is_dead_lettered_by_the_recorder_and_leaves_no_gap(js, nats_server, database, tmp_path):
    await js.publish(f"{subjects.EVENTS}.ingest.committed", b"\x00garbage", headers={"Nats-Msg-Id": "g1"})
    await publish_all(js, failed_run("run-after"))
    svc = await start_audit(nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        # The dead-letter announcement is itself an event, recorded at position 4.
        await wait_for(lambda: _checkpoint_at(conn, 4))
        skipped = await conn.fetchrow("SELECT * FROM run_event_skipped_positions")
        types = [r["type"] for r in await conn.fetch("SELECT type FROM run_events ORDER BY global_position")]
        gaps = await find_gaps(conn)
        unattributed = await timeline.run_timeline(conn, "unattributed")
    finally:
        await conn.close()
        await stop_audit(svc)
    assert skipped["global_position"] == 1 and skipped["reason_code"] == "bus.malformed_message"
    assert types == ["run.start", "ingest.failed", "bus.message_dead_lettered"]
    assert gaps == []
    assert unattributed["run"]["status"] == "failed"


@pytest.mark.parametrize("statement", [
    "UPDATE run_events SET type = 'tampered'",
    "DELETE FROM run_events",
    "TRUNCATE run_events",
])
async def test_run_events_refuses_update_delete_and_truncate(database, statement):
    owner = await asyncpg.connect(database)
    app = await connect_as_app(database)
    try:
        await app.execute(
            "INSERT INTO run_events (global_position, event_id, type, schema_version, run_id, correlation_id,"
            " occurred_at, producer, severity, subject, payload) VALUES (1, $1, 'run.start', 1, 'r', 'r', now(),"
            " 'cli', 'info', 's', '{}')", uuid.uuid4())
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute(statement)  # the application role has no such privilege
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await owner.execute(statement)  # and the trigger refuses even the owner
        assert await app.fetchval("SELECT type FROM run_events") == "run.start"
    finally:
        await app.close()
        await owner.close()


async def test_the_application_role_cannot_step_out_of_its_grants(database):
    """Services log in as tuneline_app (no superuser, member of nothing): SET ROLE back to the owner,
    or switching the append-only triggers off for the session, is refused."""
    app = await connect_as_app(database)
    try:
        assert await app.fetchval("SELECT session_user") == "tuneline_app"
        assert not await app.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = session_user")
        owner = await app.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'run_events'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute(f'SET ROLE "{owner}"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("SET session_replication_role = replica")
    finally:
        await app.close()


async def test_rebuilding_the_timeline_reproduces_it_exactly(js, nats_server, database, tmp_path):
    envs = []
    for i in range(5):
        envs += successful_run(f"run-{i}", progress_steps=i) + failed_run(f"run-f{i}")
    await publish_all(js, envs)
    svc = await start_audit(nats_server, database, tmp_path, projector_batch=7)  # odd batches on purpose
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _checkpoint_at(conn, len(envs)))
        live = await timeline.snapshot(conn)
        assert await timeline.rebuild(conn, batch_size=1000) == len(envs)
        rebuilt = await timeline.snapshot(conn)
        await timeline.rebuild(conn, batch_size=1)
        rebuilt_one_by_one = await timeline.snapshot(conn)
    finally:
        await conn.close()
        await stop_audit(svc)
    assert len(live["timeline_entries"]) == len(envs) and len(live["timeline_runs"]) == 10
    assert rebuilt == live
    assert rebuilt_one_by_one == live


async def test_projection_waits_at_a_hole_in_positions_and_applies_it_once_filled(database):
    """The recorder may commit a redelivered position after later ones; the projection must not skip it."""
    envs = successful_run("run-hole", progress_steps=1)[:4]
    conn = await connect_as_app(database)

    async def record(position, env):
        await conn.execute(
            "INSERT INTO run_events (global_position, event_id, type, schema_version, run_id, correlation_id,"
            " causation_id, occurred_at, producer, severity, reason_code, subject, payload)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
            position, env.event_id, env.type, env.schema_version, env.run_id, env.correlation_id, env.causation_id,
            env.occurred_at, env.producer, env.severity.value, env.reason_code, "s", env.model_dump_json(include={"payload"})[11:-1])

    try:
        await record(1, envs[0])
        await record(2, envs[1])
        await record(4, envs[3])
        await timeline.catch_up(conn)
        assert await conn.fetchval("SELECT position FROM projection_checkpoints") == 2
        assert [g for g, _ in await find_gaps(conn)] == [3]
        await record(3, envs[2])
        await timeline.catch_up(conn)
        assert await conn.fetchval("SELECT position FROM projection_checkpoints") == 4
        types = [r["type"] for r in await conn.fetch("SELECT type FROM timeline_entries ORDER BY global_position")]
    finally:
        await conn.close()
    assert types == [e.type for e in envs]


async def test_recorder_survives_an_error_while_pulling(js, nats_server, database, tmp_path, monkeypatch):
    """An exception out of a pull (nats-py once raised a plain asyncio.TimeoutError from fetch)
    ended the recorder task silently; it must log, pull again and record what follows."""
    original = AuditService.record_from
    failures = []

    async def flaky_first_pull(self, puller):
        real = puller.next_batch

        async def next_batch():
            if not failures:
                failures.append(1)
                raise TimeoutError()
            return await real()

        puller.next_batch = next_batch
        await original(self, puller)

    monkeypatch.setattr(AuditService, "record_from", flaky_first_pull)
    svc = await start_audit(nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        await publish_all(js, failed_run("run-after-error"))
        await wait_for(lambda: _checkpoint_at(conn, 2))
    finally:
        await conn.close()
        await stop_audit(svc)
    assert failures == [1]


async def test_a_batch_that_fails_to_commit_is_retried_in_place_and_nothing_after_it_is_skipped(
        js, nats_server, database, tmp_path, monkeypatch):
    """Ack-all settles every earlier message: if a failed batch were nacked and a later one acked,
    the failed one would never come back. The recorder must keep it and retry."""
    from services.audit.recorder import Recorder as RecorderClass

    original = RecorderClass.commit
    calls = []

    async def commit_failing_once(self, batch):
        calls.append(batch.last_position)
        if len(calls) == 1:
            raise asyncpg.ConnectionDoesNotExistError("the database went away")
        return await original(self, batch)

    monkeypatch.setattr(RecorderClass, "commit", commit_failing_once)
    envs = successful_run("run-retry") + failed_run("run-retry-2")
    await publish_all(js, envs[:5])
    svc = await start_audit(nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: len(calls) >= 2, timeout=10)
        await publish_all(js, envs[5:])
        await wait_for(lambda: _checkpoint_at(conn, len(envs)))
        positions = [r[0] for r in await conn.fetch("SELECT global_position FROM run_events ORDER BY 1")]
    finally:
        await conn.close()
        await stop_audit(svc)
    assert calls[0] == calls[1]  # the same batch, retried
    assert positions == list(range(1, len(envs) + 1))


async def test_messages_a_dead_recorder_held_are_recorded_before_anything_after_them_is_acked(
        js, nats_server, database, tmp_path):
    """Ack-all settles every earlier message. A recorder killed with a batch in hand leaves it
    unacked until ack_wait sends it again; its successor, acking the newer messages it pulled first,
    settled that batch too, so it was never redelivered nor recorded: a gap for good, and the
    timeline stopped at it."""
    envs, svc = await start_after_a_dead_recorder(js, nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _checkpoint_at(conn, len(envs)), timeout=30)
        positions = [r[0] for r in await conn.fetch("SELECT global_position FROM run_events ORDER BY 1")]
        gaps = await find_gaps(conn)
    finally:
        await conn.close()
        await stop_audit(svc)
    assert positions == list(range(1, len(envs) + 1))
    assert gaps == []


async def test_projector_reconnects_after_its_database_connection_is_killed(js, nats_server, database, tmp_path):
    svc = await start_audit(nats_server, database, tmp_path)
    owner = await asyncpg.connect(database)
    conn = await connect_as_app(database)
    try:
        await publish_all(js, failed_run("run-before"))
        await wait_for(lambda: _checkpoint_at(conn, 2))
        killed = await owner.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> $1", conn.get_server_pid())
        assert killed >= 1
        await publish_all(js, failed_run("run-after"))
        await wait_for(lambda: _checkpoint_at(conn, 4), timeout=30)
        assert (await timeline.run_timeline(conn, "run-after"))["run"]["status"] == "failed"
    finally:
        await conn.close()
        await owner.close()
        await stop_audit(svc)


# --- values PostgreSQL cannot store -----------------------------------------------------------------


def _raw(env, **changes) -> bytes:
    """The envelope as JSON another publisher might write, with fields changed (`payload__x` for a payload
    field) and a fresh event id. json.dumps writes NaN and Infinity as bare tokens."""
    d = json.loads(encode(env))
    d["event_id"] = str(uuid.uuid4())
    for path, value in changes.items():
        *head, last = path.split("__")
        target = d
        for key in head:
            target = target[key]
        target[last] = value
    return json.dumps(d).encode()


def _unstorable(good):
    """Messages that pass pydantic but not PostgreSQL: (subject, body, the reason code each is dead-lettered with)."""
    progress = next(e for e in good if e.type == "training.progress")
    failure = failed_run("run-nul")[1]  # ingest.failed: a free-text message in its payload
    return [
        (subject_of(progress), _raw(progress, payload__loss=float("nan")), "bus.malformed_message"),  # not JSON
        (subject_of(progress), _raw(progress, payload__loss=float("inf")), "bus.malformed_message"),  # not JSON either
        # jsonb refuses the escape \u0000, a text column the NUL character itself.
        (subject_of(failure), _raw(failure, payload__message="a \x00 in the text"), UNSTORABLE_REASON),
        (subject_of(failure), _raw(failure, run_id="run-\x00nul", correlation_id="run-\x00nul"), UNSTORABLE_REASON),
        # Year 1 at +01:00 is before year 1 in UTC, where asyncpg converts it.
        (subject_of(progress), _raw(progress, occurred_at="0001-01-01T00:00:00+01:00"), UNSTORABLE_REASON),
    ]


async def _publish_mixed(js, good, bad):
    """Half the good events, the bad messages, the other half; returns the bad messages' positions."""
    half = len(good) // 2
    await publish_all(js, good[:half])
    positions = [(await js.publish(subject, data, headers={"Nats-Msg-Id": f"bad-{i}"})).seq
                 for i, (subject, data, _) in enumerate(bad)]
    await publish_all(js, good[half:])
    return positions


async def test_a_batch_with_values_postgresql_refuses_records_the_rest_and_accounts_for_each_refusal(
        js, nats_server, database):
    good = successful_run("run-good", progress_steps=2)
    bad = _unstorable(good)
    bad_positions = await _publish_mixed(js, good, bad)
    pool = await asyncpg.create_pool(database, server_settings={"role": "tuneline_app"})
    sub = await js.pull_subscribe(f"{subjects.ROOT}.>", durable="refusals", stream=subjects.STREAM)
    msgs = await sub.fetch(len(good) + len(bad), timeout=5)
    assert len(msgs) == len(good) + len(bad)  # one batch, one transaction
    out = await Recorder(pool, js).record(msgs)
    async with pool.acquire() as conn:
        recorded = [r["event_id"] for r in await conn.fetch("SELECT event_id FROM run_events ORDER BY global_position")]
        skipped = [tuple(r) for r in await conn.fetch(
            "SELECT global_position, reason_code FROM run_event_skipped_positions ORDER BY 1")]
    await pool.close()
    assert recorded == [e.event_id for e in good]
    assert skipped == list(zip(bad_positions, [code for *_, code in bad]))
    assert (out.appended, out.dead_lettered) == (len(good), len(bad))
    assert out.refused == bad_positions[2:]  # NaN and Infinity are refused before PostgreSQL sees them


async def test_unstorable_messages_are_dead_lettered_once_with_a_failure_event_and_recording_goes_on(
        js, nats_server, database, tmp_path):
    """Before: PostgreSQL refused the batch, the recorder retried it forever, and nothing after it was recorded."""
    good = successful_run("run-good", progress_steps=2)
    bad = _unstorable(good)
    bad_positions = await _publish_mixed(js, good, bad)
    total = len(good) + 2 * len(bad)  # each bad message is answered by one dead-letter event
    svc = await start_audit(nats_server, database, tmp_path)
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _checkpoint_at(conn, total))
        rows = await conn.fetch("SELECT global_position, type, run_id, payload FROM run_events ORDER BY 1")
        skipped = [tuple(r) for r in await conn.fetch(
            "SELECT global_position, reason_code FROM run_event_skipped_positions ORDER BY 1")]
        gaps = await find_gaps(conn)
        dead = await wait_for(lambda: _dead_letters(js))
    finally:
        await conn.close()
        await stop_audit(svc)
    assert skipped == list(zip(bad_positions, [code for *_, code in bad]))
    assert gaps == []
    # Every good event recorded, then the dead-letter announcements, all storable (no second round).
    assert [r["type"] for r in rows] == [e.type for e in good] + ["bus.message_dead_lettered"] * len(bad)
    announced = {json.loads(r["payload"])["stream_sequence"]: r["run_id"] for r in rows[len(good):]}
    assert sorted(announced) == bad_positions
    assert announced[bad_positions[3]] == "run-nul"  # the NUL taken out of the run id it is attributed to
    assert [int(m.headers["Tuneline-Original-Sequence"]) for m in dead] == bad_positions
    assert [m.headers["Tuneline-Reason-Code"] for m in dead] == [code for *_, code in bad]


async def test_the_migrator_sets_the_application_role_password_from_the_environment(database, monkeypatch):
    from services.audit.migrate import migrate

    owner = await asyncpg.connect(database)
    try:
        await owner.execute("ALTER ROLE tuneline_app PASSWORD NULL")
        monkeypatch.setenv("TUNELINE_APP_DB_PASSWORD", "s3cret-app")
        await migrate(database)
        assert await owner.fetchval("SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'tuneline_app'")
    finally:
        await owner.execute("ALTER ROLE tuneline_app PASSWORD NULL")
        await owner.close()


def _rows(envs, first: int):
    return [(first + i, e.event_id, e.type, e.schema_version, e.run_id, e.correlation_id, e.causation_id, e.occurred_at,
             e.producer, e.severity.value, e.reason_code, subject_of(e), json.dumps(e.payload)) for i, e in enumerate(envs)]


_COLUMNS = ("global_position", "event_id", "type", "schema_version", "run_id", "correlation_id", "causation_id",
            "occurred_at", "producer", "severity", "reason_code", "subject", "payload")


async def test_rebuild_compares_with_the_live_projection_at_its_checkpoint_while_events_arrive(database, monkeypatch):
    """Events recorded beyond the live checkpoint (the projector not there yet) must not make `tuneline
    rebuild timeline` report a difference: it replays up to the checkpoint, and the projector goes on."""
    from services.cli.main import _rebuild

    conn = await connect_as_app(database)
    try:
        first, later = successful_run("run-a"), successful_run("run-a2") + failed_run("run-b")
        await conn.copy_records_to_table("run_events", records=_rows(first, 1), columns=_COLUMNS)
        await timeline.catch_up(conn)
        live = await timeline.snapshot(conn)
        await conn.copy_records_to_table("run_events", records=_rows(later, len(first) + 1), columns=_COLUMNS)
        monkeypatch.setenv("DATABASE_URL", database)
        monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
        n, same, position = await _rebuild()
        assert (n, same, position) == (len(first), True, len(first))
        assert await timeline.snapshot(conn) == live
        assert await timeline.catch_up(conn) == len(later)
        assert len((await timeline.snapshot(conn))["timeline_entries"]) == len(first) + len(later)
    finally:
        await conn.close()


def test_a_training_command_for_a_run_nobody_started_is_not_sent(database, monkeypatch, capsys):
    """It used to be published, and the timeline then showed a run of its own, RUNNING for ever."""
    import argparse

    from services.cli.main import cmd_train_control

    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")  # nothing listens: sending would fail loudly
    rc = cmd_train_control(argparse.Namespace(action="cancel", run_id="run-nobody-started", reason=None))
    assert rc == 1 and "no run run-nobody-started is recorded: nothing sent" in capsys.readouterr().err


async def test_databases_of_one_cluster_migrate_at_the_same_time(postgres):
    """The app role belongs to the cluster: two migrators of different databases raced on it ("tuple
    concurrently updated") and one failed."""
    import asyncio

    from services.audit.migrate import migrate

    admin = await asyncpg.connect(postgres.url)
    try:
        for i in range(6):
            await admin.execute(f'CREATE DATABASE "t_par_{i}"')
    finally:
        await admin.close()
    reports = await asyncio.gather(*(migrate(postgres.url.replace("/tuneline?", f"/t_par_{i}?")) for i in range(6)))
    assert all(r.applied and not r.skipped for r in reports)
