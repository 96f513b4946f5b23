"""Blue/green rebuild of a projection (D8): version N+1 is built from run_events beside version N, compared
with it row by row at the same position, and made the one readers use only when identical or when asked.

Where the versions live: the live version's tables are the ones every reader and the live projector name
(`timeline_runs`, ... in the public schema). Version V, while not live, keeps its tables under the same
names in the schema `timeline_v<V>`, with a checkpoint table of its own (projection_checkpoints), so the
projection's own code builds it unchanged with that schema first on the search path. Switching moves the
live tables into `timeline_v<N>` and the new ones into public, in one transaction, under the live
checkpoint's row lock (the live projector waits, and goes on from the same position on the new tables).
Version N stays in its schema until dropped. This runs as the database owner (DDL); the application role
can only read and project.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import asyncpg

from services.audit.projections import history, timeline
from services.common.logging import get_logger

log = get_logger(__name__)

# What each projection that can be rebuilt blue/green is made of: its module (NAME, catch_up) and its tables.
PROJECTIONS = {
    "timeline": (timeline, ("timeline_runs", "timeline_stages", "timeline_entries")),
    "history": (history, ("history_runs", "history_datasets")),
}
# Failure clusters are not a projection of their own: the API groups the timeline's entries by stage and
# reason code when asked (services/api/reads.py). Rebuilding them is rebuilding the timeline, compared
# also as clusters (what an operator reads), and switched with it.
DERIVED = {"failure_clusters": "timeline"}
# The serving view is a JetStream key-value bucket, not tables: services/audit/replay_serving.py.
NAMES = (*PROJECTIONS, *DERIVED, "serving")
_CHECKPOINTS = "projection_checkpoints"
_SAMPLES = 5


class ReplayRefused(Exception):
    """The replay cannot go ahead as asked (an unknown projection, dropping the live version)."""


@dataclass
class TableDiff:
    only_live: int
    only_new: int
    samples: list[str] = field(default_factory=list)  # a few differing rows, as text

    @property
    def total(self) -> int:
        return self.only_live + self.only_new


@dataclass
class ReplayReport:
    projection: str
    live_version: int
    version: int
    position: int = 0
    events: int = 0
    differences: dict[str, TableDiff] = field(default_factory=dict)
    switched: bool = False
    forced: bool = False
    wall_s: float = 0.0

    @property
    def identical(self) -> bool:
        return all(d.total == 0 for d in self.differences.values())

    @property
    def outcome(self) -> str:
        return "switched" if self.switched else "kept_aside"


def schema_of(projection: str, version: int) -> str:
    return f"{projection}_v{version}"


async def live_version(conn: asyncpg.Connection, projection: str) -> int:
    v = await conn.fetchval("SELECT version FROM projection_versions WHERE projection = $1 AND state = 'live'",
                            projection)
    return v or 1  # before any replay, the tables the migrations made are version 1


async def versions(conn: asyncpg.Connection, projection: str) -> list[dict]:
    rows = await conn.fetch("SELECT * FROM projection_versions WHERE projection = $1 ORDER BY version", projection)
    return [dict(r) for r in rows]


async def _create_version(conn: asyncpg.Connection, projection: str, tables: tuple[str, ...], actor: str) -> tuple[int, int]:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tuneline.replay.' || $1))", projection)
        live = await live_version(conn, projection)
        await conn.execute("INSERT INTO projection_versions (projection, version, state) VALUES ($1, $2, 'live')"
                           " ON CONFLICT DO NOTHING", projection, live)
        new = await conn.fetchval("SELECT max(version) FROM projection_versions WHERE projection = $1", projection) + 1
        schema = schema_of(projection, new)
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        for table in (*tables, _CHECKPOINTS):
            await conn.execute(f'CREATE TABLE "{schema}"."{table}" (LIKE public."{table}" INCLUDING ALL)')
        await conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO tuneline_app')
        await conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO tuneline_app')
        await conn.execute("INSERT INTO projection_versions (projection, version, state, built_by) "
                           "VALUES ($1, $2, 'building', $3)", projection, new, actor)
    return live, new


async def _compare(conn: asyncpg.Connection, tables: tuple[str, ...], schema: str) -> dict[str, TableDiff]:
    """Row by row, in PostgreSQL: the rows of each live table not in the new version's, and the reverse."""
    out = {}
    for table in tables:
        live, new = f'public."{table}"', f'"{schema}"."{table}"'
        only_live = await conn.fetch(f"SELECT t::text AS row FROM (SELECT * FROM {live} EXCEPT ALL SELECT * FROM {new}) t")
        only_new = await conn.fetch(f"SELECT t::text AS row FROM (SELECT * FROM {new} EXCEPT ALL SELECT * FROM {live}) t")
        samples = ([f"v-live {r['row'][:300]}" for r in only_live[:_SAMPLES]]
                   + [f"v-new  {r['row'][:300]}" for r in only_new[:_SAMPLES]])
        out[table] = TableDiff(len(only_live), len(only_new), samples)
    return out


async def _switch(conn: asyncpg.Connection, projection: str, tables: tuple[str, ...], live: int, new: int,
                  position: int) -> None:
    """Readers and the live projector see version `new` from this transaction's commit on."""
    old_schema, new_schema = schema_of(projection, live), schema_of(projection, new)
    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{old_schema}"')
    for table in tables:
        await conn.execute(f'ALTER TABLE public."{table}" SET SCHEMA "{old_schema}"')
        await conn.execute(f'ALTER TABLE "{new_schema}"."{table}" SET SCHEMA public')
    await conn.execute("UPDATE projection_versions SET state = 'retired' WHERE projection = $1 AND version = $2",
                       projection, live)
    await conn.execute("UPDATE projection_versions SET state = 'live', switched_at = now() "
                       "WHERE projection = $1 AND version = $2", projection, new)
    await conn.execute("UPDATE projection_checkpoints SET position = $2, error_position = NULL, error = NULL, "
                       "updated_at = now() WHERE projection = $1", projection, position)


async def rebuild_beside(dsn: str, projection: str, *, actor: str, switch: bool = False, batch: int = 5000,
                         on_total=None, on_batch=None) -> ReplayReport:
    """Build the next version of `projection` from run_events beside the live one, compare, and switch when
    identical or when `switch`. `dsn` names the owner. Raises ProjectionError (the new version is left
    `failed`, the live one untouched)."""
    clusters = projection in DERIVED
    projection = DERIVED.get(projection, projection)
    if projection not in PROJECTIONS:
        raise ReplayRefused(f"no projection {projection!r} can be rebuilt blue/green (known: {', '.join(NAMES)})")
    module, tables = PROJECTIONS[projection]
    began = time.perf_counter()
    live_conn = await asyncpg.connect(dsn)
    build_conn = await asyncpg.connect(dsn)
    try:
        live, new = await _create_version(live_conn, projection, tables, actor)
        report = ReplayReport(projection, live, new)
        schema = schema_of(projection, new)
        await build_conn.execute(f'SET search_path = "{schema}", public')
        try:
            # Most of the work, while the live projection goes on: up to where it stood when this began.
            start = await live_conn.fetchval(f"SELECT coalesce((SELECT position FROM {_CHECKPOINTS} "
                                             "WHERE projection = $1), 0)", module.NAME)
            if on_total is not None:
                on_total(await live_conn.fetchval("SELECT count(*) FROM run_events WHERE global_position <= $1", start))
            report.events = await module.catch_up(build_conn, batch, until=start, on_batch=on_batch)
            async with live_conn.transaction():
                # The live projector waits on this row lock; the new version catches up to the same position.
                position = await live_conn.fetchval(
                    f"SELECT position FROM {_CHECKPOINTS} WHERE projection = $1 FOR UPDATE", module.NAME) or 0
                report.events += await module.catch_up(build_conn, batch, until=position, on_batch=on_batch)
                report.position = position
                report.differences = await _compare(live_conn, tables, schema)
                if clusters:
                    report.differences["failure_clusters"] = await _compare_clusters(live_conn, schema)
                report.forced = switch and not report.identical
                if report.identical or switch:
                    await _switch(live_conn, projection, tables, live, new, position)
                    report.switched = True
                else:
                    await live_conn.execute("UPDATE projection_versions SET state = 'aside' "
                                            "WHERE projection = $1 AND version = $2", projection, new)
                await live_conn.execute(
                    "UPDATE projection_versions SET position = $3, differences = $4::jsonb "
                    "WHERE projection = $1 AND version = $2", projection, new, position,
                    _differences_json(report.differences))
        except BaseException:
            await live_conn.execute("UPDATE projection_versions SET state = 'failed' "
                                    "WHERE projection = $1 AND version = $2 AND state = 'building'", projection, new)
            raise
    finally:
        await build_conn.close()
        await live_conn.close()
    report.wall_s = time.perf_counter() - began
    log.info("projection_replayed", projection=projection, version=new, live_version=live, position=report.position,
             events=report.events, identical=report.identical, switched=report.switched)
    return report


# The clusters as services/api/reads.py groups them (its counts, not its example runs or summaries).
_CLUSTERS = """
SELECT e.stage, e.reason_code, count(*) AS events, count(DISTINCT e.run_id) AS runs,
       min(e.occurred_at) AS first_seen, max(e.occurred_at) AS last_seen
FROM {schema}.timeline_entries e WHERE e.reason_code IS NOT NULL GROUP BY e.stage, e.reason_code
"""


async def _compare_clusters(conn: asyncpg.Connection, schema: str) -> TableDiff:
    live, new = _CLUSTERS.format(schema="public"), _CLUSTERS.format(schema=f'"{schema}"')
    only_live = await conn.fetch(f"SELECT t::text AS row FROM ({live} EXCEPT ALL {new}) t")
    only_new = await conn.fetch(f"SELECT t::text AS row FROM ({new} EXCEPT ALL {live}) t")
    samples = ([f"v-live {r['row'][:300]}" for r in only_live[:_SAMPLES]]
               + [f"v-new  {r['row'][:300]}" for r in only_new[:_SAMPLES]])
    return TableDiff(len(only_live), len(only_new), samples)


def _differences_json(differences: dict[str, TableDiff]) -> str:
    import json

    return json.dumps({t: {"only_live": d.only_live, "only_new": d.only_new} for t, d in differences.items()})


async def drop_version(dsn: str, projection: str, version: int) -> None:
    """Drop a version that is not live: its schema and its tables."""
    projection = DERIVED.get(projection, projection)
    if projection not in PROJECTIONS:
        raise ReplayRefused(f"no projection {projection!r} (known: {', '.join(PROJECTIONS)})")

    async def drop_schema(conn) -> None:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_of(projection, version)}" CASCADE')

    await drop_checked(dsn, projection, version, drop_schema)


async def drop_checked(dsn: str, projection: str, version: int, drop) -> None:
    """Under the projection's replay lock: refuse the live version and one not there, else `await drop(conn)`
    (what holds the version: a schema, a bucket) and mark it dropped."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tuneline.replay.' || $1))", projection)
            if version == await live_version(conn, projection):
                raise ReplayRefused(f"{projection} v{version} is the live version: switch to another first")
            state = await conn.fetchval("SELECT state FROM projection_versions WHERE projection = $1 AND version = $2",
                                        projection, version)
            if state is None or state == "dropped":
                raise ReplayRefused(f"no {projection} v{version} to drop")
            await drop(conn)
            await conn.execute("UPDATE projection_versions SET state = 'dropped' WHERE projection = $1 AND version = $2",
                               projection, version)
    finally:
        await conn.close()
