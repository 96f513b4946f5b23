"""`tuneline import openai-jobs` end to end: the real `openai` SDK against the fake of the documented API, a real
nats-server, PostgreSQL and the audit recorder. Importing twice imports nothing new (run_events unchanged), and
--target registers each succeeded job once, numbered in the target's version sequence."""

from __future__ import annotations

import asyncio
import contextlib
import io

import pytest

from contracts import subjects
from contracts.registry import decode
from services.audit.db import connect_as_app
from services.audit.recorder import recorder_lag
from services.cli import import_cmds
from services.cli.main import main
from tests.conftest import wait_for
from tests.connected.test_audit import start_audit, stop_audit
from tests.unit.test_hosted_archive import TRAIN, VALID
from tests.unit.test_hosted_openai import KEY, FakeProvider, backend_for

pytestmark = pytest.mark.connected


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


async def test_import_twice_imports_nothing_new_and_registers_each_succeeded_job_once(
        js, nats_server, database, tmp_path, monkeypatch):
    fake = FakeProvider(total_steps=3)
    jobs = [fake.finished_job(TRAIN, validation=VALID, outcome="failed" if i == 2 else "succeeded") for i in range(5)]
    fake.delete_file(fake.jobs[jobs[0]]["result_files"][0])  # the provider dropped one result file
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("TUNELINE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(import_cmds, "make_backend", lambda args: backend_for(fake, list_page_size=2))
    audit = await start_audit(nats_server, database, tmp_path)
    conn = await connect_as_app(database)

    async def recorded() -> int:
        await wait_for(lambda: _caught_up(conn, js), timeout=30)
        return await conn.fetchval("SELECT count(*) FROM run_events")

    try:
        argv = ["import", "openai-jobs", "--target", "support-bot"]
        code, out, err = await asyncio.to_thread(run_cli, argv)
        assert code == 0, err
        print(out)
        first = await recorded()
        code, again, err = await asyncio.to_thread(run_cli, argv + ["--json"])
        assert code == 0, err
        print(again)
        second = await recorded()
        archived = await conn.fetchval("SELECT count(DISTINCT run_id) FROM run_events "
                                       "WHERE type = 'training.provider_archived'")
    finally:
        await conn.close()
        await stop_audit(audit)

    assert "jobs found" in out and "│          5 │        5 │" in out
    assert "files no longer served by the provider: 1" in out and "registered support-bot v4" in out
    import json

    report = json.loads(again)
    assert (report["found"], len(report["imported"]), len(report["skipped_already_imported"])) == (5, 0, 5)
    assert second == first and archived == 5  # nothing new reached run_events
    info = await js.stream_info(subjects.STREAM)
    registrations = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(subjects.STREAM, seq)
        assert KEY.encode() not in msg.data
        if msg.subject.startswith("tuneline.evt.registry.support-bot."):
            registrations.append(decode(msg.data)[1])
    assert [(r.version, r.hosted_job_id) for r in registrations] == [
        (v, j) for v, j in zip(range(1, 5), [j for j in jobs[::-1] if j != jobs[2]])]
    assert all(r.training_file_sha256 for r in registrations)


async def _caught_up(conn, js) -> bool:
    return (await recorder_lag(conn, js, subjects.STREAM))["lag"] == 0
