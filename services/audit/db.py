"""PostgreSQL connections: the owner connects to migrate; services log in as `tuneline_app`.

DATABASE_URL names the owner (it migrates). A service derives its own DSN from it: the same server
and database, the user tuneline_app, and the password from TUNELINE_APP_DB_PASSWORD (none: for a
server that trusts local connections, as the embedded pgserver does). Logging in as the application
role, rather than as the owner with `role=tuneline_app` set for the session, is what makes the
database's refusals binding: a superuser session could SET ROLE back and change run_events.
"""

from __future__ import annotations

import os
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

APP_ROLE = "tuneline_app"
APP_PASSWORD_ENV = "TUNELINE_APP_DB_PASSWORD"


def app_dsn(dsn: str, password: str | None = None) -> str:
    """`dsn` with the user and password of the application role (see the module docstring)."""
    if password is None:
        password = os.environ.get(APP_PASSWORD_ENV) or None
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    auth = APP_ROLE + (f":{quote(password, safe='')}" if password else "")
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


async def connect_as_app(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(app_dsn(dsn))


async def app_pool(dsn: str, **kw) -> asyncpg.Pool:
    return await asyncpg.create_pool(app_dsn(dsn), **kw)
