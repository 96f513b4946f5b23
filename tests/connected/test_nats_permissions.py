"""Who may publish what, against a real nats-server with the stack's users (services/common/nats_auth.py):
a prep credential cannot forge a promotion (the server refuses the publish, nothing reaches the stream
or run_events) while prep's own events pass; each service starts and consumes as its own user."""

from __future__ import annotations

import asyncio

import asyncpg
import nats
import pytest

from contracts import subjects
from contracts.commands import PromoteVersion
from contracts.events import PrepPrepared, VersionPromoted
from services.audit.app import AuditService
from services.audit.settings import AuditSettings
from services.common.bus import PublishError, config_differs, declare_streams, dlq_config, publish, run_events_config
from services.common.nats_auth import connect_options
from tests.conftest import wait_for
from tests.factories import envelope, plan, ref

pytestmark = pytest.mark.connected


async def connect_as(server, user: str, errors: list | None = None):
    async def error_cb(exc):
        if errors is not None:
            errors.append(exc)

    return await nats.connect(server.url, error_cb=error_cb, allow_reconnect=False,
                              **connect_options(user, server.passwords[user]))


def promoted(run_id: str):
    return envelope(VersionPromoted(target="support-bot", actor="mallory", reason="forged", version=1),
                    run_id=run_id, producer="prep")


def prepared(run_id: str):
    return envelope(PrepPrepared(plan=plan(), manifest=ref("m"), train=ref("t"), eval=ref("e"), label_space=["a", "b"],
                                 train_rows=8, eval_rows=2, dataset_version="v"), run_id=run_id, producer="prep")


async def test_a_prep_credential_cannot_publish_registry_promoted_and_nothing_is_recorded(nats_server, database,
                                                                                            tmp_path):
    pw = nats_server.passwords
    audit = AuditService(AuditSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "d",
                                       projector_poll_s=0.1, nats_user="audit", nats_password=pw["audit"]))
    await audit.prepare_broker()  # as audit: declares the streams, creates its durable
    await audit.broker.start()
    errors: list = []
    nc = await connect_as(nats_server, "prep", errors)
    conn = await asyncpg.connect(database)
    try:
        js = nc.jetstream()
        own = prepared("run-own")
        ack = await publish(js, own, subjects.subject_for(own.type, kind="event"))
        assert ack.seq >= 1

        forged = promoted("run-forged")
        for subject in (subjects.subject_for(forged.type, kind="event", target="support-bot"),
                        subjects.subject_for(forged.type, kind="event")):
            with pytest.raises(PublishError):
                await publish(js, forged, subject, timeout=2.0)
        command = envelope(PromoteVersion(target="support-bot", version="1", reason="r", actor="mallory"),
                           run_id="run-forged", producer="prep")
        with pytest.raises(PublishError):
            await publish(js, command, subjects.subject_for(command.type, kind="command"), timeout=2.0)
        assert any("permissions violation" in str(e).lower() and "registry" in str(e) for e in errors), errors

        # prep's own event is recorded; the forged ones are in neither the stream nor run_events
        await wait_for(lambda: conn.fetchval("SELECT count(*) FROM run_events WHERE run_id = 'run-own'"), timeout=20)
        admin = await nats.connect(nats_server.url)  # the fixture's no-credential user is admin
        info = await admin.jetstream().stream_info(subjects.STREAM, subjects_filter=f"{subjects.ROOT}.>")
        await admin.close()
        assert set(info.state.subjects or {}) == {subjects.subject_for(own.type, kind="event")}
        await asyncio.sleep(0.5)
        rows = await conn.fetch("SELECT run_id, type FROM run_events")
        assert [(r["run_id"], r["type"]) for r in rows] == [("run-own", "prep.prepared")]
    finally:
        await conn.close()
        await nc.close()
        await audit._shutdown()
        await audit.broker.stop()


async def test_the_api_and_cli_users_send_commands_but_no_event(nats_server, js):
    for user in ("api", "cli"):
        nc = await connect_as(nats_server, user)
        try:
            ujs = nc.jetstream()
            command = envelope(PromoteVersion(target="support-bot", version="1", reason="r", actor=user),
                               run_id=f"registry-{user}", producer=user)
            await publish(ujs, command, subjects.subject_for(command.type, kind="command"))
            with pytest.raises(PublishError):
                await publish(ujs, promoted(f"run-{user}"), subjects.subject_for(
                    "registry.promoted", kind="event", target="support-bot"), timeout=2.0)
            # reading is allowed: stream info, an ordered consumer over the stream
            assert (await ujs.stream_info(subjects.STREAM)).state.messages >= 1
            got = asyncio.Queue()
            sub = await ujs.subscribe(f"{subjects.COMMANDS}.>", cb=got.put, ordered_consumer=True)
            assert (await asyncio.wait_for(got.get(), 10)).subject.startswith(subjects.COMMANDS)
            await sub.unsubscribe()
        finally:
            await nc.close()


async def test_no_user_may_update_or_delete_the_stream(nats_server, js):
    nc = await connect_as(nats_server, "registry")
    try:
        rjs = nc.jetstream(timeout=2.0)
        with pytest.raises(nats.errors.TimeoutError):
            await rjs.delete_stream(subjects.STREAM)
        # the server's config is what we declare: a service's start asks for no update, so none is refused
        for cfg in (run_events_config(), dlq_config()):
            assert config_differs(cfg, (await rjs.stream_info(cfg.name)).config) == []
        await declare_streams(rjs)
    finally:
        await nc.close()
    assert (await js.stream_info(subjects.STREAM)).config.name == subjects.STREAM


async def test_a_wrong_password_is_refused(nats_server):
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=0,
                           **connect_options("prep", "not-the-password"))


@pytest.mark.parametrize("name", ["ingest", "prep", "export", "registry"])
async def test_each_service_starts_and_creates_its_consumers_as_its_own_user(nats_server, tmp_path, name):
    import importlib

    app = importlib.import_module(f"services.{name}.app")
    settings_mod = importlib.import_module(f"services.{name}.settings")
    cls = next(v for k, v in vars(settings_mod).items() if k.endswith("Settings") and k != "ServiceSettings")
    svc = app.build(cls(nats_url=nats_server.url, data_dir=tmp_path / "d", nats_user=name,
                        nats_password=nats_server.passwords[name]))
    await svc.prepare_broker()
    await svc.broker.start()
    try:
        admin = await nats.connect(nats_server.url)
        try:
            for durable in svc._durables:
                await wait_for(lambda d=durable: _consumer_exists(admin, d), timeout=15)
        finally:
            await admin.close()
    finally:
        await svc.broker.stop()


async def _consumer_exists(nc, durable: str) -> bool:
    try:
        await nc.jetstream().consumer_info(subjects.STREAM, durable)
        return True
    except Exception:  # noqa: BLE001 - not yet
        return False


async def test_the_registry_as_its_own_user_registers_promotes_and_writes_serving_for_a_cli_command(nats_server,
                                                                                                    tmp_path):
    """Each party as its own user: export's event, the CLI's command, the registry's per-target events
    (appended with the expected sequence) and its `serving` bucket, read back by the CLI."""
    from services.cli.registry_cmds import send
    from services.registry.app import build
    from services.registry.log import read_target
    from services.registry.settings import RegistrySettings
    from tests.connected.test_registry_lifecycle import _serving_at, export_completed

    pw = nats_server.passwords
    svc = build(RegistrySettings(nats_url=nats_server.url, data_dir=tmp_path / "r", smoke=False, nats_user="registry",
                                 nats_password=pw["registry"]))
    await svc.prepare_broker()
    await svc.broker.start()
    export, cli = await connect_as(nats_server, "export"), await connect_as(nats_server, "cli")
    try:
        env = export_completed("run-1", "faq-bot", True)
        await publish(export.jetstream(), env, subjects.subject_for(env.type, kind="event"))
        cjs = cli.jetstream()
        await wait_for(lambda: _validated(cjs, "faq-bot"), timeout=30)
        got, state = await send(cjs, PromoteVersion(target="faq-bot", version="1", reason="r", actor="alice"))
        assert got["type"] == "registry.promoted" and state.production.version == 1
        assert (await wait_for(lambda: _serving_at(cjs, "faq-bot", state.last_sequence)))["version"] == 1
        assert (await read_target(cjs, "faq-bot")).versions[1].status == "production"
    finally:
        await export.close()
        await cli.close()
        await svc.broker.stop()


async def _validated(js, target):
    from services.registry.log import read_target

    state = await read_target(js, target)
    return 1 in state.versions and state.versions[1].status == "validated"
