"""Idempotent migrator: applies infra/postgres/*.sql in name order, each once, and refuses a
file that changed after it was applied."""

from __future__ import annotations

import hashlib
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
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (filename, sha256) VALUES ($1, $2)", f.name, sha)
            applied.append(f.name)
        return MigrationReport(applied, skipped)
    finally:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        await conn.close()


async def ensure_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
