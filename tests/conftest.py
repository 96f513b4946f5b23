"""Fixtures that start real servers: a nats-server per test (fast) and one PostgreSQL per session
with a fresh, migrated database per test. DATABASE_URL / NATS_URL are ignored here on purpose:
tests never touch servers they did not start."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import asyncpg
import nats
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    from services.cli.stack import start_postgres, stop_postgres

    pg = start_postgres(tmp_path_factory.mktemp("pg"))
    yield pg
    stop_postgres(pg.pgdata)


@pytest.fixture
async def database(postgres):
    """A fresh migrated database; yields the owner DSN (services connect as tuneline_app)."""
    from services.audit.migrate import migrate

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = postgres.url.replace("/tuneline?", f"/{name}?")
    await migrate(dsn)
    yield dsn


@pytest.fixture
def nats_server(tmp_path):
    """A nats-server with the stack's users (services/common/nats_auth.py), passwords in `.passwords`; a
    connection without credentials acts as admin, so a test connects as a service only when it asks to."""
    from services.cli.stack import start_nats
    from services.common.nats_auth import ADMIN, new_passwords

    server = start_nats(tmp_path / "nats", passwords=new_passwords(), no_auth_user=ADMIN)
    yield server
    server.stop()


@pytest.fixture
async def js(nats_server):
    from services.common.bus import declare_streams

    nc = await nats.connect(nats_server.url)
    jsc = nc.jetstream()
    await declare_streams(jsc)
    yield jsc
    await nc.close()


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll an async or sync predicate until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
