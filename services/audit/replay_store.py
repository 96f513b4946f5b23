"""Rebuilding the store from the bus (`tuneline replay store --into URL`): run_events recorded again from the
JetStream stream into a fresh database, by the recorder's own code (decoding, dead-letter decisions, hash
chain), then compared with the live store position by position (event ids, hashes, skipped positions). The
proof that the bus and the store agree (D1, D19).

The rebuild reads the stream through a temporary durable consumer that acks nothing (ack policy none), so it
takes nothing from the live recorder. What the recorder would dead-letter is decided the same way and shows
as skipped positions in the rebuilt store, but nothing is published: a replay never writes to the live bus
(its dead letters were published when the message was first recorded).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts import subjects
from services.audit.db import app_pool
from services.audit.migrate import migrate
from services.audit.pull import RawBatchPuller
from services.audit.recorder import Recorder
from services.common.logging import get_logger

log = get_logger(__name__)

_SAMPLES = 10
_CHUNK = 50_000  # positions compared per round trip


class StoreReplayRefused(Exception):
    """The rebuild cannot go ahead (audit.store_replay_refused): the target is the live database, or holds
    events already, or cannot be reached."""


def _server(dsn: str) -> tuple[str, int, str]:
    """(host or socket directory, port, database) of a DSN."""
    parts = urlsplit(dsn)
    socket = (parse_qs(parts.query).get("host") or [""])[0]
    return parts.hostname or socket, parts.port or 5432, parts.path.strip("/")


def where(dsn: str) -> str:
    """host:port/database of a DSN, without user or password: what an event may say about it."""
    host, port, name = _server(dsn)
    return f"{host}:{port}/{name}"


def _same_database(a: str, b: str) -> bool:
    return _server(a) == _server(b)


@dataclass
class _Ack:
    seq: int = 0
    duplicate: bool = False
    stream: str = ""


@dataclass
class DeadLetterSink:
    """Stands in for JetStream where the recorder would dead-letter: keeps what it would have published."""

    _nc: object  # for bus.fits(): the real connection's max_payload
    published: list[tuple[str, bytes]] = field(default_factory=list)

    async def publish(self, subject: str, payload: bytes = b"", timeout: float | None = None, stream=None,
                      headers=None) -> _Ack:
        self.published.append((subject, payload))
        return _Ack()


@dataclass
class StoreDiff:
    compared_from: int = 0
    compared_to: int = 0
    hashes_compared: bool = True
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("only_live", "only_rebuilt", "event_id", "hash", "skipped"), 0))
    samples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if len(self.samples) < _SAMPLES:
            self.samples.append(f"{kind}: {text}")


@dataclass
class StoreReport:
    into: str
    stream_first: int = 0
    stream_last: int = 0
    events: int = 0           # rows the rebuild appended
    skipped: int = 0          # positions it skipped (what the recorder dead-letters)
    live_settled: int = 0     # every live position up to here is recorded or skipped
    diff: StoreDiff = field(default_factory=StoreDiff)
    rebuild_s: float = 0.0
    compare_s: float = 0.0

    @property
    def identical(self) -> bool:
        return self.diff.total == 0

    @property
    def wall_s(self) -> float:
        return self.rebuild_s + self.compare_s


async def _fresh(dsn: str) -> None:
    """Create the database if it does not exist, migrate it, and refuse it if it holds events."""
    try:
        conn = await asyncpg.connect(dsn)
        await conn.close()
    except asyncpg.InvalidCatalogNameError:
        parts = urlsplit(dsn)
        name = parts.path.strip("/")
        admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreReplayRefused(f"cannot reach {where(dsn)}: {exc}") from None
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM run_events) OR "
                               "EXISTS (SELECT 1 FROM run_event_skipped_positions)"):
            raise StoreReplayRefused(f"{where(dsn)} already holds events: give a fresh (or new) database")
    finally:
        await conn.close()


async def record_stream(nats_url: str, dsn: str, *, stream: str = subjects.STREAM, batch: int = 5000,
                        on_total=None, on_batch=None) -> tuple[int, int, int, int]:
    """Record every message of `stream` (up to its last sequence when this starts) into the migrated database
    `dsn` with the recorder's code. Returns (first, last, rows appended, positions skipped)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    durable = f"replay-store-{uuid.uuid4().hex[:10]}"
    pool = await app_pool(dsn, min_size=1, max_size=2)
    try:
        info = await js.stream_info(stream)
        first, last = info.state.first_seq, info.state.last_seq
        if on_total is not None:
            on_total(info.state.messages)
        if info.state.messages == 0:
            return first, last, 0, 0
        await js.add_consumer(stream, ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
            filter_subject=f"{subjects.ROOT}.>", inactive_threshold=120.0, max_waiting=4))
        recorder = Recorder(pool, DeadLetterSink(nc))
        recorder.settled_up_to(first - 1)  # positions before the stream's first are gone from the bus
        puller = RawBatchPuller(nats_url, stream, durable, batch=batch, wait_s=2.0, name="tuneline-replay-store")
        await puller.start()
        committing: asyncio.Task | None = None
        try:
            position, quiet = first - 1, 0
            while position < last:
                msgs = await puller.next_batch()
                if not msgs:
                    quiet += 1
                    if quiet >= 5:  # 10 s with nothing: what is left was deleted (a limit), not lost here
                        log.warning("replay_store_stream_ended_early", at=position, last=last)
                        break
                    continue
                quiet = 0
                prepared = recorder.prepare(msgs)
                if committing is not None:
                    await committing
                committing = asyncio.create_task(recorder.commit(prepared))
                position = max(position, prepared.last_position)
                if on_batch is not None:
                    on_batch(len(msgs), position)
            if committing is not None:
                await committing
        finally:
            if committing is not None and not committing.done():
                committing.cancel()
            await puller.stop()
            try:
                await js.delete_consumer(stream, durable)
            except Exception as exc:  # noqa: BLE001 - it expires by itself (inactive_threshold)
                log.warning("replay_store_consumer_left", durable=durable, error=repr(exc))
        async with pool.acquire() as conn:
            appended = await conn.fetchval("SELECT count(*) FROM run_events")
            skipped = await conn.fetchval("SELECT count(*) FROM run_event_skipped_positions")
        return first, last, appended, skipped
    finally:
        await pool.close()
        await nc.close()


async def _settled(conn: asyncpg.Connection) -> int:
    return await conn.fetchval(
        "SELECT greatest((SELECT coalesce(max(global_position), 0) FROM run_events),"
        " (SELECT coalesce(max(global_position), 0) FROM run_event_skipped_positions))")


async def _positions(conn: asyncpg.Connection, lo: int, hi: int) -> dict[int, tuple]:
    out: dict[int, tuple] = {r[0]: ("row", r[1], r[2]) for r in await conn.fetch(
        "SELECT global_position, event_id, hash FROM run_events WHERE global_position BETWEEN $1 AND $2", lo, hi)}
    for r in await conn.fetch("SELECT global_position, reason_code FROM run_event_skipped_positions "
                              "WHERE global_position BETWEEN $1 AND $2", lo, hi):
        out.setdefault(r[0], ("skipped", r[1], None))
    return out


async def compare_stores(live_dsn: str, rebuilt_dsn: str, lo: int, hi: int, *, hashes: bool = True,
                         on_batch=None) -> StoreDiff:
    """Position by position from `lo` to `hi`: what each store holds there (a row: its event id and hash; a
    skipped position: its reason code)."""
    diff = StoreDiff(lo, hi, hashes)
    live, rebuilt = await asyncpg.connect(live_dsn), await asyncpg.connect(rebuilt_dsn)
    try:
        for start in range(lo, hi + 1, _CHUNK):
            end = min(hi, start + _CHUNK - 1)
            a, b = await asyncio.gather(_positions(live, start, end), _positions(rebuilt, start, end))
            for pos in sorted(a.keys() | b.keys()):
                x, y = a.get(pos), b.get(pos)
                if x == y:
                    continue
                if y is None:
                    diff.add("only_live", f"position {pos}: live {x[0]} {x[1]}, nothing rebuilt from the stream")
                elif x is None:
                    diff.add("only_rebuilt", f"position {pos}: {y[0]} {y[1]} from the stream, nothing in the live store")
                elif x[0] != y[0] or x[0] == "skipped":
                    diff.add("skipped", f"position {pos}: live {x[0]} {x[1]}, rebuilt {y[0]} {y[1]}")
                elif x[1] != y[1]:
                    diff.add("event_id", f"position {pos}: live event {x[1]}, stream event {y[1]}")
                elif hashes and x[2] != y[2]:
                    diff.add("hash", f"position {pos}: event {x[1]} live hash {(x[2] or b'').hex()[:16]}..., "
                                     f"rebuilt {(y[2] or b'').hex()[:16]}...")
            if on_batch is not None:
                on_batch(end - start + 1, end)
    finally:
        await live.close()
        await rebuilt.close()
    return diff


async def replay_store(nats_url: str, live_dsn: str, into_dsn: str, *, batch: int = 5000, on_total=None,
                       on_batch=None) -> StoreReport:
    """Rebuild run_events from the stream into `into_dsn` (created and migrated if need be; refused if it is
    the live database or holds events) and compare it with the live store. Both DSNs name owners."""
    if _same_database(live_dsn, into_dsn):
        raise StoreReplayRefused(f"{where(into_dsn)} is the live database: give another one")
    await _fresh(into_dsn)
    report = StoreReport(where(into_dsn))
    began = time.perf_counter()
    report.stream_first, report.stream_last, report.events, report.skipped = await record_stream(
        nats_url, into_dsn, batch=batch, on_total=on_total, on_batch=on_batch)
    report.rebuild_s = time.perf_counter() - began
    began = time.perf_counter()
    conn = await asyncpg.connect(live_dsn)
    try:
        report.live_settled = await _settled(conn)
    finally:
        await conn.close()
    # Up to what both have seen: positions the live recorder has not reached yet are its lag, not a difference.
    hi = min(report.stream_last, report.live_settled)
    if report.stream_last >= report.stream_first:
        report.diff = await compare_stores(live_dsn, into_dsn, report.stream_first, hi,
                                           hashes=report.stream_first == 1)
    report.compare_s = time.perf_counter() - began
    log.info("store_replayed", into=report.into, events=report.events, compared_from=report.diff.compared_from,
             compared_to=report.diff.compared_to, differences=report.diff.total)
    return report
