"""Bearer tokens of the HTTP API (D18): minted by the database owner, kept as sha256 only, read by the API.

A token is 32 random bytes (urlsafe base64) behind a `tl_` prefix: that much entropy needs no slow hash, a
sha256 lookup is enough. Tokens live in PostgreSQL (infra/postgres/050_table_api_tokens.sql) rather than a
file under the data dir because the API runs wherever the database is reachable (compose, several hosts),
and because tuneline_app may only SELECT them: a compromised API process cannot mint itself a token."""

from __future__ import annotations

import hashlib
import re
import secrets

import asyncpg

ROLES = ("viewer", "operator", "approver", "admin")
# What each role may do beyond reading; admin may do everything.
GRANTS = {"viewer": frozenset(), "operator": frozenset({"operate"}), "approver": frozenset({"approve"}),
          "admin": frozenset({"operate", "approve"})}
PREFIX = "tl_"
ADMIN_SUBJECT = "admin"
_SUBJECT = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def may(role: str, permission: str) -> bool:
    return permission == "read" or permission in GRANTS.get(role, frozenset())


def check(role: str, subject: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not _SUBJECT.fullmatch(subject):
        raise ValueError(f"subject {subject!r}: 1-128 characters of letters, digits and _ . @ : -")


async def create(owner_dsn: str, role: str, subject: str) -> str:
    """Mint a token (as the database owner); returns it: it is never stored, only its hash."""
    check(role, subject)
    token = new_token()
    conn = await asyncpg.connect(owner_dsn)
    try:
        await conn.execute("INSERT INTO api_tokens (token_sha256, token_prefix, subject, role) VALUES ($1, $2, $3, $4)",
                           token_hash(token), token[:8], subject, role)
    finally:
        await conn.close()
    return token


async def ensure_admin(owner_dsn: str) -> str | None:
    """The local admin token `tuneline up` prints once: minted when no admin token exists, else None."""
    conn = await asyncpg.connect(owner_dsn)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE api_tokens IN SHARE ROW EXCLUSIVE MODE")
            if await conn.fetchval("SELECT 1 FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL"):
                return None
            token = new_token()
            await conn.execute("INSERT INTO api_tokens (token_sha256, token_prefix, subject, role) "
                               "VALUES ($1, $2, $3, 'admin')", token_hash(token), token[:8], ADMIN_SUBJECT)
            return token
    finally:
        await conn.close()


async def lookup(conn, token: str) -> tuple[str, str] | None:
    """(subject, role) of a live token, or None."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    row = await conn.fetchrow("SELECT subject, role FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
                              token_hash(token))
    return (row["subject"], row["role"]) if row else None
