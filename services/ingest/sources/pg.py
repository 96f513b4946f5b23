"""PostgreSQL queries.

`PgSource(dsn_env, query)`: the DSN is read from the environment variable NAMED `dsn_env` when load()
or describe() runs (missing: ingest.dsn_env_missing). Rows stream through a server-side cursor in a
READ ONLY transaction, `prefetch` rows per round trip, so memory stays bounded and writes are
refused by the server (ingest.query_failed).

Threading: load() is a plain iterator. It runs a private event loop in the calling thread, so call
it from a worker thread (asyncio.to_thread), never from a thread whose event loop is running.
Stopping the iteration early (or closing the generator) rolls back and closes the connection.

Values are JSON-able: Decimal -> string (no precision lost); datetime/date/time -> ISO 8601;
timedelta -> seconds (float); UUID, inet, ranges and other types -> str(); bytea -> base64 string;
json/jsonb -> the decoded value; arrays -> lists. `row_number` is the 1-based row index, `offset`
the 0-based one; `raw` is the row as JSON.

Secrets: the DSN, its password, user and host never appear in a message, an exception (connect
errors are re-raised `from None`, described by class, never by the driver's text), describe() or a
log; server error texts (query errors) are passed on with anything that looks like the DSN or its
password blanked out.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from services.ingest.sources.base import SourceDescription, SourceError, SourceRecord, new_record
from services.ingest.sources.hf import jsonable, raw_json

DEFAULT_PREFETCH = 1000
CONNECT_TIMEOUT_S = 10.0
# How long one statement (the cursor's query, one fetch of `prefetch` rows, describe()'s prepare) may run.
# Ingest answers one command of a kind at a time, and heartbeats keep a running one alive: a query that
# never finishes would hold every later command of that kind. Past it the server cancels the statement
# (ingest.query_failed, SQLSTATE 57014).
STATEMENT_TIMEOUT_S = 900.0


def _secrets_of(dsn: str) -> list[str]:
    """The strings that must never be shown: the DSN, and its password, user and host."""
    found = [dsn]
    try:
        parts = urlsplit(dsn)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
        if parts.username:
            found += [parts.username, unquote(parts.username)]
        if parts.hostname:
            found.append(parts.hostname)
        if parts.netloc:
            found.append(parts.netloc)
    except ValueError:
        pass
    for key in ("password", "user", "host"):  # key=value DSNs, and query parameters
        for m in re.finditer(rf"(?i)\b{key}=([^\s&;]+)", dsn):
            found += [m.group(1), unquote(m.group(1))]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


class PgSource:
    format = "pg"

    def __init__(self, dsn_env: str, query: str, *, env: Mapping[str, str] | None = None,
                 prefetch: int = DEFAULT_PREFETCH, connect_timeout: float = CONNECT_TIMEOUT_S,
                 statement_timeout_s: float = STATEMENT_TIMEOUT_S, **_ignored):
        if prefetch < 1:
            raise ValueError("prefetch must be positive")
        self.dsn_env = dsn_env
        self.query = query
        self.env = os.environ if env is None else env
        self.prefetch = prefetch
        self.connect_timeout = connect_timeout
        if statement_timeout_s <= 0:
            raise ValueError("statement_timeout_s must be positive")
        self.statement_timeout_ms = max(1, int(statement_timeout_s * 1000))

    def __repr__(self) -> str:
        return f"PgSource(dsn_env={self.dsn_env!r}, query={self.query!r})"

    # -- plumbing ---------------------------------------------------------------------------------

    def _dsn(self) -> str:
        dsn = self.env.get(self.dsn_env)
        if not dsn:
            raise SourceError("ingest.dsn_env_missing",
                              f"the environment variable {self.dsn_env} is not set (or empty) in the ingest service's "
                              "environment; it must hold the PostgreSQL DSN (for the embedded stack, export it "
                              "before `tuneline up`: services keep the environment they started with)")
        return dsn

    async def _connect(self, dsn: str):
        import asyncpg

        try:
            conn = await asyncpg.connect(dsn, timeout=self.connect_timeout)
        except asyncpg.InvalidPasswordError:
            why = "authentication failed"
        except asyncpg.InvalidAuthorizationSpecificationError:
            why = "the role is not allowed to connect"
        except asyncpg.InvalidCatalogNameError:
            why = "the database does not exist"
        except (asyncio.TimeoutError, TimeoutError):
            why = f"timed out after {self.connect_timeout:g}s"
        except asyncpg.PostgresError as exc:
            why = f"the server refused the connection (SQLSTATE {exc.sqlstate}, {type(exc).__name__})"
        except ConnectionRefusedError:
            why = "connection refused"
        except socket.gaierror:
            why = "the host name does not resolve"
        except OSError as exc:
            why = f"the server cannot be reached ({type(exc).__name__}{f', errno {exc.errno}' if exc.errno else ''})"
        except (ValueError, asyncpg.ClientConfigurationError) as exc:  # the text may hold the DSN: not shown
            why = (f"the DSN does not parse ({type(exc).__name__}); expected "
                   "postgresql://USER:PASSWORD@HOST:PORT/DBNAME[?sslmode=...]")
        except Exception as exc:  # noqa: BLE001 - the text may hold the DSN: not shown
            why = type(exc).__name__
        else:
            await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
            return conn
        raise SourceError("ingest.source_connect_failed",
                          f"cannot connect to the PostgreSQL database named by ${self.dsn_env}: {why}")

    async def _limit_statements(self, conn) -> None:
        """statement_timeout for the rest of the caller's transaction (see STATEMENT_TIMEOUT_S)."""
        await conn.execute(f"SET LOCAL statement_timeout = {self.statement_timeout_ms}")

    def _query_error(self, exc: BaseException, secrets: list[str]) -> SourceError:
        import asyncpg

        if isinstance(exc, SourceError):
            return exc
        if isinstance(exc, (asyncpg.exceptions.ConnectionDoesNotExistError, OSError, ConnectionError)):
            return SourceError("ingest.source_connect_failed",
                               f"the connection to the database named by ${self.dsn_env} was lost while reading ({type(exc).__name__})")
        if isinstance(exc, asyncpg.PostgresError):
            text = scrub(str(exc), secrets)
            return SourceError("ingest.query_failed", f"the query failed (SQLSTATE {exc.sqlstate}): {text}; query: {self.query[:500]}")
        if isinstance(exc, asyncpg.InterfaceError):
            return SourceError("ingest.query_failed", f"the query failed: {scrub(str(exc), secrets)}; query: {self.query[:500]}")
        return SourceError("ingest.query_failed", f"the query failed: {type(exc).__name__}: {scrub(str(exc), secrets)[:300]}")

    def _run(self, agen_factory) -> Iterator[Any]:
        """Drive an async generator of batches on a private event loop in this thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("PgSource.load()/describe() block: call them from a worker thread "
                               "(asyncio.to_thread), not from a thread running an event loop")
        loop = asyncio.new_event_loop()
        agen = agen_factory()
        try:
            while True:
                try:
                    batch = loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield batch
        finally:
            try:
                loop.run_until_complete(agen.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    # -- the contract --------------------------------------------------------------------------------

    def load(self) -> Iterator[SourceRecord]:
        dsn = self._dsn()
        secrets = _secrets_of(dsn)

        async def batches():
            conn = await self._connect(dsn)
            try:
                try:
                    async with conn.transaction(readonly=True):
                        await self._limit_statements(conn)
                        cursor = await conn.cursor(self.query)
                        while True:
                            rows = await cursor.fetch(self.prefetch)
                            if not rows:
                                return
                            yield rows
                except (GeneratorExit, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - classified, secrets removed
                    raise self._query_error(exc, secrets) from None
            finally:
                await conn.close(timeout=5)

        record = new_record
        index = 0
        for rows in self._run(batches):
            for row in rows:
                fields = {k: jsonable(v) for k, v in row.items()}
                yield record(index + 1, index, raw_json(fields), fields, None)
                index += 1
        if index == 0:
            raise SourceError("ingest.empty_source", f"the query returned no rows; query: {self.query[:500]}")

    def describe(self) -> SourceDescription:
        """Prepares the query (no rows are read) for its columns; EXPLAIN gives a row estimate."""
        dsn = self._dsn()
        secrets = _secrets_of(dsn)
        result: dict[str, Any] = {}

        async def run():
            conn = await self._connect(dsn)
            try:
                try:
                    async with conn.transaction(readonly=True):
                        await self._limit_statements(conn)
                        stmt = await conn.prepare(self.query)
                        result["columns"] = [a.name for a in stmt.get_attributes()]
                        result["types"] = {a.name: a.type.name for a in stmt.get_attributes()}
                        try:
                            async with conn.transaction():  # a savepoint: EXPLAIN may fail on its own
                                plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {self.query}")
                            plan = json.loads(plan) if isinstance(plan, str) else plan
                            result["estimate"] = int(plan[0]["Plan"]["Plan Rows"])
                        except Exception:  # noqa: BLE001 - an estimate is optional
                            result["estimate"] = None
                except Exception as exc:  # noqa: BLE001
                    raise self._query_error(exc, secrets) from None
            finally:
                await conn.close(timeout=5)
            yield None

        for _ in self._run(run):
            pass
        return SourceDescription(
            scheme="pg", location=self.query, format="pg", columns=result.get("columns", []),
            row_estimate=result.get("estimate"),
            details={"dsn_env": self.dsn_env, "column_types": result.get("types", {}), "prefetch": self.prefetch},
        )
