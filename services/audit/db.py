"""PostgreSQL connections: the owner connects to migrate; services act as `tuneline_app`."""

from __future__ import annotations

import asyncpg

APP_ROLE = "tuneline_app"


async def connect_as_app(dsn: str) -> asyncpg.Connection:
    # `role` in the startup packet makes tuneline_app the session's default role, so even a
    # pooled connection's RESET ALL keeps it: the database enforces what the app may do.
    return await asyncpg.connect(dsn, server_settings={"role": APP_ROLE})


async def app_pool(dsn: str, **kw) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, server_settings={"role": APP_ROLE}, **kw)
