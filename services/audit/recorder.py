"""The recorder: appends every message of RUN_EVENTS to run_events, idempotently (D1, D3).

global_position is the JetStream stream sequence, so positions are gap-free in commit order.
A batch is written in one transaction and acked only after it commits; a crash before the ack
redelivers the batch, and UNIQUE(event_id) turns the replay into a no-op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.registry import ContractError, decode
from services.common.delivery import dead_letter
from services.common.logging import get_logger

log = get_logger(__name__)

CONSUMER = "audit-recorder"
PRODUCER = "audit"

_COLUMNS = (
    "global_position", "event_id", "type", "schema_version", "run_id", "correlation_id",
    "causation_id", "occurred_at", "producer", "severity", "reason_code", "subject", "payload",
)

# One statement per batch: arrays bound as parameters, expanded by unnest.
_APPEND = f"""
INSERT INTO run_events ({", ".join(_COLUMNS)})
SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[], $7::uuid[],
                     $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::text[], $13::jsonb[])
ON CONFLICT DO NOTHING
RETURNING global_position
"""

# For rows that did not insert: what is already recorded under their event ids.
_RECORDED_BY_ID = """
SELECT event_id, global_position, type, run_id, causation_id FROM run_events WHERE event_id = ANY($1::uuid[])
"""


@dataclass
class PreparedBatch:
    msgs: list[Msg]
    rows: list[tuple] = field(default_factory=list)
    bad: list[tuple[Msg, ContractError]] = field(default_factory=list)
    last_position: int = 0


@dataclass
class BatchOutcome:
    appended: int = 0
    already_recorded: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    last_position: int = 0
    conflicts: list[int] = field(default_factory=list)


class Recorder:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext):
        self.pool = pool
        self.js = js

    async def record(self, msgs: list[Msg]) -> BatchOutcome:
        return await self.commit(self.prepare(msgs))

    @staticmethod
    def prepare(msgs: list[Msg]) -> PreparedBatch:
        """Decode a batch into rows (CPU only, no I/O): the part that overlaps the previous commit."""
        batch = PreparedBatch(msgs)
        for m in msgs:
            seq = m.metadata.sequence.stream
            batch.last_position = max(batch.last_position, seq)
            try:
                env, _ = decode(m.data)
            except ContractError as exc:
                batch.bad.append((m, exc))
                continue
            batch.rows.append((
                seq, env.event_id, env.type, env.schema_version, env.run_id, env.correlation_id,
                env.causation_id, env.occurred_at, env.producer, env.severity.value, env.reason_code,
                m.subject, json.dumps(env.payload),
            ))
        return batch

    async def commit(self, batch: PreparedBatch) -> BatchOutcome:
        """Append a prepared batch in one transaction, then dead-letter what could not be recorded."""
        out = BatchOutcome(last_position=batch.last_position)
        msgs, rows, bad = batch.msgs, batch.rows, batch.bad
        conflicts: list[tuple[Msg, str]] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if rows:
                    inserted = await _append(conn, rows)
                    out.appended = len(inserted)
                    if len(inserted) < len(rows):
                        skipped = self._explain_not_inserted(
                            [r for r in rows if r[0] not in inserted],
                            {r["event_id"]: r for r in await conn.fetch(
                                _RECORDED_BY_ID, [r[1] for r in rows if r[0] not in inserted])},
                            out,
                        )
                        by_seq = {m.metadata.sequence.stream: m for m in msgs}
                        conflicts = [(by_seq[pos], detail) for pos, code, _, detail in skipped
                                     if code == "audit.event_id_conflict"]
                        if skipped:
                            await _skip(conn, skipped)
                if bad:
                    await _skip(conn, [(m.metadata.sequence.stream, exc.reason_code, None, str(exc)[:500]) for m, exc in bad])
        # After the commit: dead-letter what could not be recorded, then ack everything.
        for m, exc in bad:
            await dead_letter(self.js, m, consumer=CONSUMER, producer=PRODUCER, reason_code=exc.reason_code, error=str(exc))
            out.dead_lettered += 1
        for m, detail in conflicts:
            await dead_letter(self.js, m, consumer=CONSUMER, producer=PRODUCER, reason_code="audit.event_id_conflict", error=detail)
            out.dead_lettered += 1
        return out

    @staticmethod
    def _explain_not_inserted(rows: list[tuple], recorded: dict, out: BatchOutcome) -> list[tuple]:
        """A row that did not insert is a redelivery (same position), a duplicate re-published
        after the dedup window (same identity, new position), or a conflict (another event)."""
        skipped = []
        for pos, event_id, etype, _v, run_id, _c, causation, *_ in rows:
            r = recorded.get(event_id)
            if r is not None and r["global_position"] == pos:
                out.already_recorded += 1
            elif r is not None and (r["type"], r["run_id"], r["causation_id"]) == (etype, run_id, causation):
                out.duplicates += 1
                skipped.append((pos, "audit.duplicate_event", event_id, f"already recorded at {r['global_position']}"))
            else:
                out.conflicts.append(pos)
                where = (f"recorded at {r['global_position']} as {r['type']} of run {r['run_id']}" if r
                         else "position already holds another event")
                skipped.append((pos, "audit.event_id_conflict", event_id,
                                f"event_id {event_id} is {where}; refused {etype} of run {run_id}"))
        return skipped


async def _append(conn: asyncpg.Connection, rows: list[tuple]) -> set[int]:
    """Append rows; returns the positions inserted.

    The common case (all new) is a COPY, as fast as PostgreSQL takes rows. A redelivered batch or a
    re-used event id makes the COPY fail on a unique constraint; the savepoint rolls that back and
    the batch goes through INSERT ... ON CONFLICT DO NOTHING, which reports what it inserted.
    """
    try:
        async with conn.transaction():  # a savepoint inside the batch's transaction
            await conn.copy_records_to_table("run_events", records=rows, columns=_COLUMNS)
        return {r[0] for r in rows}
    except asyncpg.UniqueViolationError:
        return {r[0] for r in await conn.fetch(_APPEND, *zip(*rows))}


async def _skip(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    await conn.executemany(
        "INSERT INTO run_event_skipped_positions (global_position, reason_code, event_id, detail) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (global_position) DO NOTHING",
        rows,
    )


async def recorder_lag(conn: asyncpg.Connection, js: JetStreamContext, stream: str) -> dict:
    """How far the recorder is behind the stream, and any unexplained hole in positions."""
    info = await js.stream_info(stream)
    recorded = await conn.fetchval(
        "SELECT greatest((SELECT coalesce(max(global_position), 0) FROM run_events),"
        " (SELECT coalesce(max(global_position), 0) FROM run_event_skipped_positions))"
    )
    return {"stream_last_seq": info.state.last_seq, "recorded_position": recorded,
            "lag": max(0, info.state.last_seq - recorded)}


async def find_gaps(conn: asyncpg.Connection, limit: int = 20) -> list[tuple[int, int]]:
    """Ranges of positions below the highest recorded one that are neither recorded nor skipped."""
    rows = await conn.fetch(
        """
        WITH p AS (
          SELECT global_position AS pos FROM run_events
          UNION ALL SELECT global_position FROM run_event_skipped_positions
        ), o AS (SELECT pos, lag(pos, 1, 0::bigint) OVER (ORDER BY pos) AS prev FROM p)
        SELECT prev + 1 AS first_missing, pos - 1 AS last_missing FROM o WHERE pos > prev + 1
        ORDER BY pos LIMIT $1
        """,
        limit,
    )
    return [(r["first_missing"], r["last_missing"]) for r in rows]
