"""PgSource against the fixture PostgreSQL: streaming through a server-side cursor in a read-only
transaction, JSON-able values, and failures (connect, query, env, writes) with registered codes and
messages that never show the DSN, its password or its host."""

from __future__ import annotations

import asyncio
import base64
import logging
import traceback
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from services.ingest.sources.base import SourceError
from services.ingest.sources.locators import open_source, parse_locator
from services.ingest.sources.pg import PgSource

pytestmark = pytest.mark.connected

PASSWORD = "Zq8-Tuneline-S3cret-pw"
ROWS = 10_000


def with_password(dsn: str, user: str = "ingest_reader") -> str:
    """The fixture DSN (a unix socket, trust auth) with a recognisable user and password in it."""
    parts = urlsplit(dsn)
    netloc = f"{user}:{quote(PASSWORD)}@" + parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def items(database):
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(f"""
            DROP ROLE IF EXISTS ingest_reader;
            CREATE ROLE ingest_reader LOGIN PASSWORD '{PASSWORD}';
            CREATE TABLE items (id int PRIMARY KEY, text text, label text, price numeric(10, 2), created timestamptz,
                                day date, uid uuid, blob bytea, meta jsonb, tags text[]);
            INSERT INTO items SELECT i, 'row ' || i, 'l' || (i % 5), i / 100.0, '2024-01-01T00:00:00Z'::timestamptz + i * interval '1 minute',
                                     '2024-01-01'::date, md5(i::text)::uuid, '\\x00ff'::bytea, jsonb_build_object('i', i), ARRAY['a', 'b']
            FROM generate_series(1, {ROWS}) AS i;
            GRANT SELECT ON items TO ingest_reader;
        """)
    finally:
        await conn.close()
    yield with_password(database)
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("DROP TABLE items; DROP OWNED BY ingest_reader; DROP ROLE ingest_reader")
    finally:
        await conn.close()


def no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and quote(PASSWORD) not in text and "ingest_reader" not in text, text


def error_texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


async def test_a_query_streams_10k_rows_in_order_with_json_able_values(items, caplog):
    caplog.set_level(logging.DEBUG)
    src = PgSource("TL_SRC_DSN", "SELECT * FROM items ORDER BY id", env={"TL_SRC_DSN": items}, prefetch=700)
    records = await asyncio.to_thread(lambda: list(src.load()))
    assert len(records) == ROWS and all(r.error is None for r in records)
    assert [r.row_number for r in records[:3]] == [1, 2, 3] and records[-1].offset == ROWS - 1
    first = records[0].fields
    assert first == {"id": 1, "text": "row 1", "label": "l1", "price": "0.01", "created": "2024-01-01T00:01:00+00:00",
                     "day": "2024-01-01", "uid": "c4ca4238-a0b9-2382-0dcc-509a6f75849b",
                     "blob": base64.b64encode(b"\x00\xff").decode(), "meta": {"i": 1}, "tags": ["a", "b"]}
    assert [r.fields["id"] for r in records] == list(range(1, ROWS + 1))
    assert '"text":"row 1"' in records[0].raw
    description = await asyncio.to_thread(src.describe)
    assert description.columns == ["id", "text", "label", "price", "created", "day", "uid", "blob", "meta", "tags"]
    assert description.location == "SELECT * FROM items ORDER BY id" and description.details["dsn_env"] == "TL_SRC_DSN"
    assert 5_000 <= description.row_estimate <= 20_000
    no_secret(repr(description), caplog.text)


async def test_the_locator_path_works_end_to_end(items, monkeypatch):
    monkeypatch.setenv("TL_LOC_DSN", items)
    loc = parse_locator("pg:TL_LOC_DSN?query=SELECT%20text,%20label%20FROM%20items%20WHERE%20id%20<=%203%20ORDER%20BY%20id")
    src = open_source(loc, roots=[])
    rows = await asyncio.to_thread(lambda: [r.fields for r in src.load()])
    assert rows == [{"text": f"row {i}", "label": f"l{i % 5}"} for i in (1, 2, 3)]
    no_secret(str(loc), repr(loc), repr(src))


async def test_stopping_early_closes_the_connection(items, database):
    src = PgSource("DSN", "SELECT id FROM items ORDER BY id", env={"DSN": items}, prefetch=100)

    def first_five():
        it = src.load()
        got = [next(it).fields["id"] for _ in range(5)]
        it.close()
        return got

    assert await asyncio.to_thread(first_five) == [1, 2, 3, 4, 5]
    admin = await asyncpg.connect(database)
    try:
        for _ in range(50):
            left = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'ingest_reader'")
            if left == 0:
                break
            await asyncio.sleep(0.05)
        assert left == 0
    finally:
        await admin.close()


async def test_a_write_is_refused_by_the_read_only_transaction(items, database):
    src = PgSource("DSN", "INSERT INTO items (id, text) VALUES (-1, 'x') RETURNING id", env={"DSN": with_password(database, "postgres")})
    with pytest.raises(SourceError) as err:
        await asyncio.to_thread(lambda: list(src.load()))
    assert err.value.reason_code == "ingest.query_failed" and "read-only transaction" in str(err.value)
    admin = await asyncpg.connect(database)
    try:
        assert await admin.fetchval("SELECT count(*) FROM items WHERE id = -1") == 0
    finally:
        await admin.close()


async def test_a_bad_query_fails_with_the_server_message_and_no_secret(items):
    src = PgSource("DSN", "SELECT nope FROM no_such_table", env={"DSN": items})
    for call in (lambda: list(src.load()), src.describe):
        with pytest.raises(SourceError) as err:
            await asyncio.to_thread(call)
        assert err.value.reason_code == "ingest.query_failed"
        assert "no_such_table" in str(err.value) and "does not exist" in str(err.value)
        no_secret(*error_texts(err.value))


async def test_a_query_that_runs_past_the_statement_timeout_is_cancelled_with_a_reason(items):
    """A query that never finished held the ingest command's queue for good (heartbeats kept it alive)."""
    src = PgSource("DSN", "SELECT id, pg_sleep(30) FROM items LIMIT 1", env={"DSN": items}, statement_timeout_s=0.5)
    with pytest.raises(SourceError) as err:
        await asyncio.to_thread(lambda: list(src.load()))
    # SQLSTATE 57014: the server cancelled it (a query run to its end would have returned its row)
    assert err.value.reason_code == "ingest.query_failed" and "57014" in str(err.value)
    assert "statement timeout" in str(err.value)
    no_secret(*error_texts(err.value))


def test_the_ingest_settings_pass_the_statement_timeout_to_a_pg_source():
    from services.ingest.settings import IngestSettings

    src = open_source("pg:DSN?query=SELECT 1", env={"DSN": "x"},
                      **IngestSettings(pg_statement_timeout_s=2.5).limits())
    assert src.statement_timeout_ms == 2500


async def test_an_empty_result_is_an_empty_source(items):
    src = PgSource("DSN", "SELECT * FROM items WHERE false", env={"DSN": items})
    with pytest.raises(SourceError) as err:
        await asyncio.to_thread(lambda: list(src.load()))
    assert err.value.reason_code == "ingest.empty_source"


@pytest.mark.parametrize("dsn", [
    f"postgresql://ingest_reader:{PASSWORD}@127.0.0.1:1/tuneline",               # a closed port
    f"postgresql://ingest_reader:{PASSWORD}@db-host.invalid:5432/tuneline",       # a host that does not resolve
    f"host=127.0.0.1 port=1 user=ingest_reader password={PASSWORD} dbname=x",   # key=value form
    f"postgresql://ingest_reader:{PASSWORD}@[not a host/x",                       # does not parse
])
def test_a_dsn_that_does_not_connect_fails_without_showing_it(dsn, caplog):
    caplog.set_level(logging.DEBUG)
    src = PgSource("TL_BAD_DSN", "SELECT 1", env={"TL_BAD_DSN": dsn}, connect_timeout=3)
    for call in (lambda: list(src.load()), src.describe):
        with pytest.raises(SourceError) as err:
            call()
        assert err.value.reason_code == "ingest.source_connect_failed"
        assert "TL_BAD_DSN" in str(err.value) and "cannot connect" in str(err.value)
        no_secret(*error_texts(err.value), caplog.text)
        for text in error_texts(err.value):
            assert "127.0.0.1" not in text and "db-host.invalid" not in text


async def test_wrong_password_is_a_connect_failure_without_the_password(items, database):
    # the fixture server trusts local sockets; a role that may not log in stands in for bad credentials
    admin = await asyncpg.connect(database)
    try:
        await admin.execute("ALTER ROLE ingest_reader NOLOGIN")
    finally:
        await admin.close()
    src = PgSource("DSN", "SELECT 1", env={"DSN": items})
    with pytest.raises(SourceError) as err:
        await asyncio.to_thread(lambda: list(src.load()))
    assert err.value.reason_code == "ingest.source_connect_failed"
    no_secret(*error_texts(err.value))


def test_a_missing_env_var_is_named():
    src = PgSource("TL_NOT_SET_ANYWHERE", "SELECT 1", env={})
    for call in (lambda: list(src.load()), src.describe):
        with pytest.raises(SourceError) as err:
            call()
        assert err.value.reason_code == "ingest.dsn_env_missing" and "TL_NOT_SET_ANYWHERE" in str(err.value)
        assert "ingest service's environment" in str(err.value)  # not the shell that runs the CLI


async def test_calling_load_on_the_event_loop_thread_is_a_clear_error():
    with pytest.raises(RuntimeError, match="worker thread"):
        list(PgSource("DSN", "SELECT 1", env={"DSN": "postgresql://x@127.0.0.1:1/x"}).load())
