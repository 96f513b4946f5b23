"""How a projection follows run_events (D8), shared by the timeline and History: batches of contiguous
positions after its checkpoint, each applied with the checkpoint in one transaction; it stops at an error,
recording the failing position, rather than skipping the event; a rebuild replays from position 0."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import asyncpg

from services.common.logging import get_logger

log = get_logger(__name__)

# Writes a batch's rows and the checkpoint after them, in the caller's transaction.
ApplyBatch = Callable[[asyncpg.Connection, list, int], Awaitable[None]]


class ProjectionError(RuntimeError):
    def __init__(self, position: int, message: str):
        super().__init__(f"position {position}: {message}")
        self.position = position


_READ = """
SELECT global_position, event_id, type, run_id, correlation_id, occurred_at, severity, reason_code, payload
FROM run_events WHERE global_position > $1 ORDER BY global_position LIMIT $2
"""

_SKIPPED_AFTER = """
SELECT global_position FROM run_event_skipped_positions
WHERE global_position > $1 AND global_position <= $2
"""


def contiguous_checkpoint(checkpoint: int, positions: list[int], skipped: set[int]) -> int:
    """The highest position up to which every position is either recorded or skipped.

    The recorder can commit positions out of order (a redelivered message arrives after later
    ones); applying past a hole would skip that event forever, so the projection stops at it and
    waits. A hole that never fills is a gap, reported by `tuneline status`.
    """
    present = set(positions) | skipped
    while checkpoint + 1 in present:
        checkpoint += 1
    return checkpoint


async def next_batch(conn: asyncpg.Connection, position: int, batch_size: int) -> tuple[list, int]:
    """Rows to apply after `position` (a contiguous run of positions) and the checkpoint after them."""
    rows = await conn.fetch(_READ, position, batch_size)
    upper = rows[-1]["global_position"] if rows else position + batch_size
    skipped = {r[0] for r in await conn.fetch(_SKIPPED_AFTER, position, upper)}
    checkpoint = contiguous_checkpoint(position, [r["global_position"] for r in rows], skipped)
    return [r for r in rows if r["global_position"] <= checkpoint], checkpoint


async def ensure_checkpoint(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute("INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING", name)


async def advance(conn: asyncpg.Connection, name: str, checkpoint: int) -> None:
    """Move the checkpoint past a batch just written (clearing any error it had stopped on)."""
    await conn.execute("UPDATE projection_checkpoints SET position = $2, updated_at = now(), error_position = NULL, "
                       "error = NULL WHERE projection = $1", name, checkpoint)


async def record_error(conn: asyncpg.Connection, name: str, position: int, error: str) -> None:
    await conn.execute("UPDATE projection_checkpoints SET error_position = $2, error = $3, updated_at = now() "
                       "WHERE projection = $1", name, position, error[:2000])
    log.error("projection_stopped", projection=name, error_position=position, error=error[:500],
              reason_code="audit.projection_failed")


async def catch_up(conn: asyncpg.Connection, name: str, apply_batch: ApplyBatch, batch_size: int, *,
                   until: int | None = None, on_batch=None) -> int:
    """Apply every event past `name`'s checkpoint (up to `until`, if given), one transaction per batch;
    returns events applied. `on_batch(events, checkpoint)` is called after each batch commits."""
    await ensure_checkpoint(conn, name)
    applied = 0
    while True:
        try:
            async with conn.transaction():
                # The row lock serialises this projector with a concurrent rebuild.
                position = await conn.fetchval(
                    "SELECT position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE", name)
                rows, checkpoint = await next_batch(conn, position, batch_size)
                if until is not None and checkpoint > until:
                    rows, checkpoint = [r for r in rows if r["global_position"] <= until], max(until, position)
                if checkpoint == position:
                    return applied
                # A projection is rebuilt from run_events at will and its checkpoint commits with its
                # rows, so a crash that loses the last few of these transactions (whole, as an
                # asynchronous commit can) only sends the projector back a few batches. So it does not
                # wait for the WAL flush at commit; the recorder's transactions, which precede acks, do.
                await conn.execute("SET LOCAL synchronous_commit = off")
                await apply_batch(conn, rows, checkpoint)
        except ProjectionError as exc:
            await record_error(conn, name, exc.position, str(exc))
            raise
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
            raise  # the connection, not the projection: the caller reconnects and resumes
        except Exception as exc:
            position = await conn.fetchval("SELECT position FROM projection_checkpoints WHERE projection = $1", name)
            await record_error(conn, name, position + 1, repr(exc))
            raise ProjectionError(position + 1, repr(exc)) from exc
        applied += len(rows)
        if on_batch is not None:
            on_batch(len(rows), checkpoint)


async def rebuild(conn: asyncpg.Connection, name: str, tables: Iterable[str], apply_batch: ApplyBatch,
                  batch_size: int, *, until: int | None = None) -> int:
    """Empty `tables` and replay run_events from position 0 (up to `until`) in one transaction.

    Readers keep seeing the old rows until the commit (MVCC), and the live projector waits on the
    checkpoint row lock, so nobody observes a half-built projection. With `until` the checkpoint stays
    there, and an error the live projector stopped on beyond `until` stays recorded.
    """
    await ensure_checkpoint(conn, name)
    applied = 0
    async with conn.transaction():
        live = await conn.fetchrow(
            "SELECT error_position, error FROM projection_checkpoints WHERE projection = $1 FOR UPDATE", name)
        for table in tables:
            await conn.execute(f"DELETE FROM {table}")
        position = 0
        await conn.execute("UPDATE projection_checkpoints SET position = 0 WHERE projection = $1", name)
        while True:
            rows, checkpoint = await next_batch(conn, position, batch_size)
            if until is not None and checkpoint > until:
                rows, checkpoint = [r for r in rows if r["global_position"] <= until], until
            if checkpoint == position:
                break
            await apply_batch(conn, rows, checkpoint)
            position = checkpoint
            applied += len(rows)
        if until is not None and live["error_position"] is not None and live["error_position"] > until:
            await conn.execute("UPDATE projection_checkpoints SET error_position = $2, error = $3 WHERE projection = $1",
                               name, live["error_position"], live["error"])
    return applied
