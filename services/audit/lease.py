"""One active recorder, any number of standbys: a PostgreSQL session advisory lock (D1, D19).

Positions are recorded in order and each row's hash links it to the one before, so exactly one process
may append to run_events at a time. Every audit process asks for the lock `tuneline.recorder` on a
connection of its own when it starts: the one that gets it is the active recorder (it records and
projects), the others are standbys that wait in `pg_advisory_lock` and do nothing else.

How a standby takes over: the lock belongs to the active's connection, so it is released the moment
that connection ends: the process killed (even kill -9: the kernel closes its socket and PostgreSQL
ends the session at once), the host gone (when PostgreSQL's TCP keepalives give up on it), or the
session terminated. One waiting standby is granted the lock and starts recording from the consumer's
ack floor and the chain's head in the database. The messages its predecessor had pulled but not acked
come to it when their ack_wait ends (TUNELINE_AUDIT_ACK_WAIT_S); positions above them are held in
memory until then, so the chain stays in position order, and rows the predecessor committed but did
not ack are recognised as already recorded.

Fencing: the active commits every batch on the connection that holds the lock (`connection()`), so a
process that lost the lock cannot append another row. When that connection is found closed, it
reconnects and takes the lock back only if no one else holds it (pg_try_advisory_lock: PostgreSQL
restarted, no standby got there first); otherwise it raises LeaseLost and the service exits (its
supervisor, `tuneline up` or the container runtime, starts it again, as a standby).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from services.audit.db import app_dsn
from services.common.logging import get_logger

log = get_logger(__name__)

LOCK_NAME = "tuneline.recorder"
# The lock's key: a bigint, the bytes "tl-recdr" (pg_locks shows it as classid = its high 32 bits, objid = its
# low 32 bits, objsubid = 1). Other advisory locks here (tuneline.migrate, tuneline.replay.*) are hashtext()s.
KEY = int.from_bytes(b"tl-recdr", "big")
APPLICATION_PREFIX = "tuneline-audit"  # application_name of the lock's connection: `tuneline status` reads it

# The sessions holding the lock (granted) or waiting for it (the standbys), the holder first, then oldest first.
_HOLDERS = f"""
SELECT l.pid AS backend_pid, l.granted, a.application_name, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = {KEY >> 32} AND l.objid::bigint = {KEY & 0xFFFFFFFF} AND l.objsubid = 1
ORDER BY l.granted DESC, a.backend_start
"""


class LeaseLost(Exception):
    """Another recorder holds the lock now: this one must stop appending (and exit)."""


def application_name(pid: int | None = None) -> str:
    return f"{APPLICATION_PREFIX} pid {pid or os.getpid()} on {socket.gethostname()}"[:63]


_APPLICATION = re.compile(rf"{APPLICATION_PREFIX} pid (\d+)(?: on (.*))?")


def instance_of(holder: dict) -> dict:
    """An audit process as `holders()` shows it: its pid and host (from its application_name), since when."""
    m = _APPLICATION.fullmatch(holder.get("application_name") or "")
    return {"pid": int(m.group(1)) if m else None, "host": m.group(2) if m else None,
            "application_name": holder.get("application_name"), "since": holder.get("backend_start")}


class RecorderLease:
    def __init__(self, database_url: str, *, retry_s: float = 1.0):
        self.dsn = app_dsn(database_url)
        self.retry_s = retry_s
        self.conn: asyncpg.Connection | None = None
        self.held = False
        self._check_interval = True

    async def _connect(self) -> asyncpg.Connection:
        # client_connection_check_interval (PostgreSQL 14+): a session waiting for the lock whose process is
        # gone (a standby killed or stopped while it waited) ends within a second instead of getting the lock
        # (and holding it until it finds no one to tell). An older server does not know the setting: without it.
        settings = {"application_name": application_name()}
        if self._check_interval:
            try:
                return await asyncpg.connect(self.dsn, server_settings={**settings,
                                                                        "client_connection_check_interval": "1000"})
            except asyncpg.UndefinedObjectError:
                self._check_interval = False
        return await asyncpg.connect(self.dsn, server_settings=settings)

    async def acquire(self) -> None:
        """Wait until this process holds the lock (a standby until then); connection errors are retried."""
        announced = False
        while True:
            try:
                conn = await self._connect()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("recorder_lease_connect_failed", error=repr(exc), retry_in_s=self.retry_s)
                await asyncio.sleep(self.retry_s)
                continue
            try:
                if not await conn.fetchval(f"SELECT pg_try_advisory_lock({KEY})"):
                    if not announced:
                        active = await holders(conn)
                        log.info("recorder_standby", active=next((h["application_name"] for h in active
                                                                  if h["granted"]), None))
                        announced = True
                    await conn.execute(f"SELECT pg_advisory_lock({KEY})")  # waits for the active one to end
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("recorder_lease_wait_failed", error=repr(exc), retry_in_s=self.retry_s)
                await _close(conn)
                await asyncio.sleep(self.retry_s)
                continue
            except BaseException:  # cancelled (shutdown) while waiting: that session must not get the lock later
                conn.terminate()
                raise
            self.conn, self.held = conn, True
            log.info("recorder_active", took_over=announced)
            return

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """The connection that holds the lock, for a commit. Found closed, it is reopened and the lock taken
        back if it is free; if another recorder holds it, LeaseLost. A connection error is raised as such
        (the caller retries)."""
        if self.conn is None or self.conn.is_closed():
            await self._retake()
        yield self.conn

    async def _retake(self) -> None:
        self.held = False
        if self.conn is not None:
            await _close(self.conn)
            self.conn = None
        conn = await self._connect()  # a connection error propagates: the commit is retried
        try:
            got = await conn.fetchval(f"SELECT pg_try_advisory_lock({KEY})")
        except BaseException:
            await _close(conn)
            raise
        if not got:
            active = await holders(conn)
            await _close(conn)
            raise LeaseLost(f"another recorder holds {LOCK_NAME}: "
                            f"{next((h['application_name'] for h in active if h['granted']), 'unknown')}")
        log.warning("recorder_lease_retaken")
        self.conn, self.held = conn, True

    async def release(self) -> None:
        self.held = False
        if self.conn is not None:
            await _close(self.conn)  # ending the session releases the lock
            self.conn = None


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5.0)
    except Exception:  # noqa: BLE001 - a dead connection: terminate it
        conn.terminate()


async def holders(conn: asyncpg.Connection) -> list[dict]:
    """Who holds the recorder lock (granted) and who waits for it (the standbys), oldest first."""
    return [dict(r) for r in await conn.fetch(_HOLDERS)]
