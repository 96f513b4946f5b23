"""Idempotent migrator: applies infra/postgres/*.sql in name order, each once, and refuses a
file that changed after it was applied."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import asyncpg

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "infra" / "postgres"

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
  filename   text PRIMARY KEY,
  sha256     text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationDrift(RuntimeError):
    pass


@dataclass(frozen=True)
class MigrationReport:
    applied: list[str]
    skipped: list[str]


async def migrate(dsn: str, schema_dir: Path = SCHEMA_DIR) -> MigrationReport:
    files = sorted(schema_dir.glob("*.sql"))
    if not files:
        raise FileNotFoundError(f"no .sql files under {schema_dir}")
    conn = await asyncpg.connect(dsn)
    try:
        # One migrator at a time (several services may start together).
        await conn.execute("SELECT pg_advisory_lock(hashtext('tuneline.migrate'))")
        await conn.execute(_LEDGER)
        done = {r["filename"]: r["sha256"] for r in await conn.fetch("SELECT filename, sha256 FROM schema_migrations")}
        applied, skipped = [], []
        for f in files:
            sql = f.read_text()
            sha = hashlib.sha256(sql.encode()).hexdigest()
            if f.name in done:
                if done[f.name] != sha:
                    raise MigrationDrift(
                        f"{f.name} changed after it was applied; add a new file instead of editing it"
                    )
                skipped.append(f.name)
                continue
            await _retrying_role_races(conn, lambda: _apply_file(conn, sql, f.name, sha))
            applied.append(f.name)
        await _hash_unchained_rows(conn)
        await _retrying_role_races(conn, lambda: _set_app_password(conn))
        return MigrationReport(applied, skipped)
    finally:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        await conn.close()


async def _apply_file(conn: asyncpg.Connection, sql: str, name: str, sha: str) -> None:
    await conn.execute(sql)
    await conn.execute("INSERT INTO schema_migrations (filename, sha256) VALUES ($1, $2)", name, sha)


async def _hash_unchained_rows(conn: asyncpg.Connection) -> None:
    """Rows recorded before run_events had a hash chain get theirs here, in position order (D19): the
    chain then starts at position 1 whatever the database's age. A no-op once every row has one."""
    from services.audit.chain import backfill

    async with conn.transaction():
        await backfill(conn)


async def _retrying_role_races(conn: asyncpg.Connection, step) -> None:
    """Run `step()` in a transaction, again when it lost a race on a role with a migrator of another
    database. Roles belong to the whole cluster, the advisory lock above to one database: two databases
    migrated at once can both create or alter tuneline_app ("role already exists", "tuple concurrently
    updated"); the retry finds the role done."""
    for attempt in range(5):
        try:
            async with conn.transaction():
                await step()
            return
        except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError, asyncpg.InternalServerError) as exc:
            if attempt == 4 or (isinstance(exc, asyncpg.InternalServerError) and "concurrently" not in str(exc)):
                raise
            await asyncio.sleep(0.05 * (attempt + 1))


async def _set_app_password(conn: asyncpg.Connection) -> None:
    """Give tuneline_app the password services log in with (services/audit/db.py), where one is set;
    every run, so that changing the variable and migrating again changes it."""
    from services.audit.db import APP_PASSWORD_ENV, APP_ROLE

    password = os.environ.get(APP_PASSWORD_ENV)
    if password:
        await conn.execute(await conn.fetchval("SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)",
                                               APP_ROLE, password))


async def ensure_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
