"""One active recorder and a standby (services/audit/lease.py), as two `python -m services.audit` processes
against real nats-server and PostgreSQL: kill -9 the active one in the middle of a stream and the standby
takes over; every position is recorded once, none is missing, and the hash chain verifies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from contracts import subjects
from services.audit import chain
from services.audit.db import connect_as_app
from services.audit.lease import RecorderLease, holders, instance_of
from services.cli.stack import REPO_ROOT
from services.common.bus import publish
from tests.conftest import wait_for
from tests.factories import failed_run, successful_run

pytestmark = pytest.mark.connected


def subject_of(env):
    kind = "command" if env.type == "run.start" else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


def start_audit(nats_server, database, tmp_path, name: str) -> subprocess.Popen:
    from services.common.nats_auth import client_env

    env = dict(os.environ, NATS_URL=nats_server.url, DATABASE_URL=database, TUNELINE_DATA_DIR=str(tmp_path / "d"),
               TUNELINE_AUDIT_ACK_WAIT_S="2", TUNELINE_AUDIT_PROJECTOR_POLL_S="0.2",
               **client_env("audit", nats_server.passwords))  # as `tuneline up` starts it: the audit user
    with open(tmp_path / f"{name}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "services.audit"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)


async def roles(conn) -> tuple[int | None, list[int]]:
    rows = await holders(conn)
    return (next((instance_of(h)["pid"] for h in rows if h["granted"]), None),
            [instance_of(h)["pid"] for h in rows if not h["granted"]])


async def test_the_standby_takes_over_when_the_active_recorder_is_killed(js, nats_server, database, tmp_path,
                                                                          monkeypatch):
    from services.cli import main as cli

    monkeypatch.setenv("NATS_URL", nats_server.url)
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("TUNELINE_DATA_DIR", str(tmp_path / "cli"))
    first = start_audit(nats_server, database, tmp_path, "first")
    second = None
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _roles_are(conn, first.pid, []), timeout=30)
        second = start_audit(nats_server, database, tmp_path, "second")
        await wait_for(lambda: _roles_are(conn, first.pid, [second.pid]), timeout=30)  # waiting: a standby
        status = await cli._status()  # what `tuneline status` shows
        assert status["recorder"]["active"]["pid"] == first.pid
        assert [s["pid"] for s in status["recorder"]["standbys"]] == [second.pid]

        runs = [successful_run(f"run-{i}") if i % 3 else failed_run(f"run-{i}") for i in range(6)]
        before = [e for run in runs[:3] for e in run]
        for env in before:
            await publish(js, env, subject_of(env))
        await wait_for(lambda: _count(conn, len(before)), timeout=30)  # the standby records nothing meanwhile

        after = [e for run in runs[3:] for e in run]
        for env in after[:10]:
            await publish(js, env, subject_of(env))
        os.kill(first.pid, signal.SIGKILL)  # mid-stream: what it pulled and did not ack comes to the standby
        for env in after[10:]:
            await publish(js, env, subject_of(env))
        await wait_for(lambda: _roles_are(conn, second.pid, []), timeout=30)
        total = len(before) + len(after)
        await wait_for(lambda: _count(conn, total), timeout=60)
        await asyncio.sleep(1.0)  # anything recorded twice would show now

        positions = [r[0] for r in await conn.fetch("SELECT global_position FROM run_events ORDER BY 1")]
        assert positions == list(range(1, total + 1))  # no gap, no duplicate
        assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM run_events") == total
        assert await conn.fetchval("SELECT count(*) FROM run_event_skipped_positions") == 0
        assert (await js.stream_info(subjects.STREAM)).state.last_seq == total
        verified = await chain.verify(conn)
        assert verified.broken is None and verified.checked == total
        # the standby projects too once active: the timeline and History reach the last position
        await wait_for(lambda: _projected(conn, total), timeout=30)
        status = await cli._status()
        assert status["recorder"]["active"]["pid"] == second.pid and status["recorder"]["standbys"] == []
        assert status["recorder"]["recorded_position"] == total and status["recorder"]["gaps"] == []
        assert {name: p["position"] for name, p in status["projections"].items()} == {"timeline": total,
                                                                                     "history": total}
    finally:
        await conn.close()
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(15)


async def test_a_recorder_that_lost_the_lock_to_another_cannot_commit(database):
    """Fencing: commits go over the connection that holds the lock; when that connection ends and another
    process has taken the lock meanwhile, the old holder gets LeaseLost instead of a connection."""
    from services.audit.lease import LeaseLost

    old, new = RecorderLease(database), RecorderLease(database)
    await old.acquire()
    taking_over = asyncio.create_task(new.acquire())
    await asyncio.sleep(0.3)
    assert not taking_over.done()  # a standby while the lock is held
    killer = await connect_as_app(database)
    try:
        # the old holder's session ends (as when its host is cut off): the standby gets the lock at once
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", old.conn.get_server_pid())
        await asyncio.wait_for(taking_over, 10)
        await wait_for(lambda: old.conn.is_closed() or _closed_by_query(old), timeout=10)
        with pytest.raises(LeaseLost, match="another recorder holds tuneline.recorder"):
            async with old.connection():
                pass
        async with new.connection() as conn:  # the new holder commits as usual
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await killer.close()
        await old.release()
        await new.release()


async def _closed_by_query(lease: RecorderLease) -> bool:
    try:
        await lease.conn.fetchval("SELECT 1")
    except Exception:  # noqa: BLE001 - the terminated session
        return True
    return lease.conn.is_closed()


async def _roles_are(conn, active: int, standbys: list[int]) -> bool:
    return await roles(conn) == (active, standbys)


async def _count(conn, n: int) -> bool:
    return await conn.fetchval("SELECT count(*) FROM run_events") >= n


async def _projected(conn, n: int) -> bool:
    positions = await conn.fetch("SELECT position FROM projection_checkpoints WHERE projection IN ('timeline', 'history')")
    return len(positions) == 2 and all(p["position"] >= n for p in positions)


async def test_a_standby_stopped_while_waiting_leaves_no_session_behind_to_take_the_lock(database):
    active, standby = RecorderLease(database), RecorderLease(database)
    await active.acquire()
    waiting = asyncio.create_task(standby.acquire())
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _waiters(conn, 1), timeout=10)
        waiting.cancel()  # the service shuts down while a standby
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await wait_for(lambda: _waiters(conn, 0), timeout=10)
        await active.release()
        again = RecorderLease(database)
        await asyncio.wait_for(again.acquire(), 10)  # the lock is free: no orphaned session took it
        await again.release()
    finally:
        await conn.close()
        await active.release()


async def _waiters(conn, n: int) -> bool:
    return len([h for h in await holders(conn) if not h["granted"]]) == n
