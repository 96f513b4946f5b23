"""The hash chain over run_events (D19): each row's `hash` is sha256(prev_hash || sha256(its canonical bytes)),
linked in position order, so an edited, removed or inserted row breaks every link after it.

The canonical bytes of an event are computed from the values of its row, the same way by the recorder
(from the message it decoded) and by `verify` (from the row PostgreSQL returns):
  a JSON array of the columns (event and causation ids as lowercase UUID text, occurred_at as integer
  microseconds since 1970-01-01 UTC), a newline, then the payload as JSON with sorted keys.
jsonb keeps the payload's values but not always their spelling: a float written with an exponent
(`1e+16`) comes back as an integer, and -0.0 as 0.0. The canonical payload writes such floats as jsonb
returns them, so a stored row hashes to what was recorded. An integer beyond 64 bits (orjson refuses it)
is written by json with the same key order rule; whichever writer a value takes, it takes it on both sides.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import orjson

from services.audit import exactjson

GENESIS = bytes(32)  # the prev_hash of the first row
_SORTED = orjson.OPT_SORT_KEYS
# What orjson writes for a float jsonb respells (or a string holding it): `e+`, `-0.0`. Looked for as two
# literals (about 1 us for a 1 kB payload), not as one alternation `e\+|-0\.0`, which made re try every
# offset (about 7 us: a third of what the chain cost the recorder). A `+` is rare in JSON: found by memchr.
_PLUS, _EXPONENT = b"+", b"e+"
_NEGATIVE_ZERO = re.compile(rb"-0\.0")  # re's literal search beats `in` here: '0' is everywhere in numbers
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def canonical_payload(payload) -> bytes:
    """The payload as the chain hashes it (and, when it needs no rewriting, as the recorder stores it)."""
    try:
        out = orjson.dumps(payload, option=_SORTED)
    except TypeError:  # an integer beyond 64 bits, or a value JSON cannot hold (the caller refuses it)
        return _json_dumps(_as_jsonb_reads(payload))
    if (_PLUS in out and _EXPONENT in out) or _NEGATIVE_ZERO.search(out):  # maybe a float jsonb respells (a
        # string holding one of these: a needless detour)
        normal = _as_jsonb_reads(payload)
        try:
            return orjson.dumps(normal, option=_SORTED)
        except TypeError:
            return _json_dumps(normal)
    return out


def _json_dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _as_jsonb_reads(value):
    """The value as it reads back from jsonb: an integral float written with an exponent becomes the
    integer its decimal spelling names, -0.0 becomes 0.0."""
    if isinstance(value, dict):
        return {k: _as_jsonb_reads(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_jsonb_reads(v) for v in value]
    if type(value) is float:
        if value == 0.0:
            return 0.0
        if abs(value) >= 1e16 and value.is_integer():  # repr() writes these with an exponent
            return int(Decimal(repr(value)))
    return value


def event_digest(position: int, event_id, etype: str, schema_version: int, run_id: str, correlation_id: str,
                 causation_id, occurred_at: datetime, producer: str, severity: str, reason_code: str | None,
                 subject: str, payload: bytes) -> bytes:
    """sha256 of an event's canonical bytes; `payload` is canonical_payload()'s output. Raises for a value a
    row cannot hold (a lone surrogate): the recorder refuses that row."""
    head = orjson.dumps([position, str(event_id).lower(), etype, schema_version, run_id, correlation_id,
                         None if causation_id is None else str(causation_id).lower(),
                         (occurred_at - _EPOCH) // _MICROSECOND, producer, severity, reason_code, subject])
    return hashlib.sha256(head + b"\n" + payload).digest()


def link(prev_hash: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(prev_hash + digest).digest()


def stored_digest(r) -> bytes:
    """event_digest() of a run_events row as PostgreSQL returns it."""
    return event_digest(r["global_position"], r["event_id"], r["type"], r["schema_version"], r["run_id"],
                        r["correlation_id"], r["causation_id"], r["occurred_at"], r["producer"], r["severity"],
                        r["reason_code"], r["subject"], canonical_payload(exactjson.loads(r["payload"])))


# --- reading the chain ------------------------------------------------------------------------------

_ROWS = """
SELECT global_position, event_id, type, schema_version, run_id, correlation_id, causation_id, occurred_at,
       producer, severity, reason_code, subject, payload::text AS payload, prev_hash, hash
FROM run_events WHERE global_position >= $1 ORDER BY global_position LIMIT $2
"""


@dataclass(frozen=True)
class ChainHead:
    position: int  # 0: no row yet
    hash: bytes

    def text(self) -> str:
        return f"{self.position}:{self.hash.hex()}"

    @classmethod
    def parse(cls, text: str) -> ChainHead:
        position, _, digest = text.strip().partition(":")
        return cls(int(position), bytes.fromhex(digest))


async def head(conn: asyncpg.Connection) -> ChainHead:
    """The last row's position and hash: what `tuneline audit anchor` prints."""
    r = await conn.fetchrow("SELECT global_position, hash FROM run_events ORDER BY global_position DESC LIMIT 1")
    if r is None:
        return ChainHead(0, GENESIS)
    return ChainHead(r["global_position"], r["hash"] or b"")


@dataclass(frozen=True)
class Break:
    position: int
    kind: str  # content (the row is not what was hashed), link (prev_hash is not its predecessor's hash), unhashed
    detail: str


@dataclass
class Verification:
    checked: int = 0
    first: int | None = None
    last: int | None = None
    head: bytes | None = None
    broken: Break | None = None


async def rows_from(conn: asyncpg.Connection, start: int, batch: int = 5000) -> AsyncIterator[list]:
    position = start
    while True:
        rows = await conn.fetch(_ROWS, position, batch)
        if not rows:
            return
        yield rows
        position = rows[-1]["global_position"] + 1


async def verify(conn: asyncpg.Connection, start: int = 1, *, on_batch=None) -> Verification:
    """Walk the chain from `start` (its first row is linked to the hash stored on the row before it) and
    stop at the first break."""
    v = Verification()
    before = await conn.fetchrow("SELECT global_position, hash FROM run_events WHERE global_position < $1"
                                 " ORDER BY global_position DESC LIMIT 1", start)
    prev = GENESIS if before is None else before["hash"]
    async for rows in rows_from(conn, start):
        for r in rows:
            pos = r["global_position"]
            if r["hash"] is None or r["prev_hash"] is None:
                v.broken = Break(pos, "unhashed", "the row carries no hash")
                return v
            if r["prev_hash"] != prev:
                v.broken = Break(pos, "link", f"prev_hash {r['prev_hash'].hex()[:16]}... is not the hash of the row "
                                              f"before it ({prev.hex()[:16] if prev else None}...): a row before it "
                                              "was removed, inserted or rehashed")
                return v
            try:
                digest = stored_digest(r)
            except Exception as exc:  # noqa: BLE001 - a value no recorder could have hashed
                v.broken = Break(pos, "content", f"the row cannot be hashed: {exc!r}")
                return v
            if link(prev, digest) != r["hash"]:
                v.broken = Break(pos, "content", "the row's values are not those its hash was computed over: "
                                                 "it was edited after it was recorded")
                return v
            prev = r["hash"]
            v.checked += 1
            v.first = pos if v.first is None else v.first
            v.last, v.head = pos, prev
        if on_batch is not None:
            on_batch(len(rows), rows[-1]["global_position"])
    return v


async def backfill(conn: asyncpg.Connection, batch: int = 5000) -> int:
    """Hash the rows recorded before the chain existed, in position order (the migrator, as the owner,
    inside its transaction). Rows recorded since carry their hash from the recorder. Returns rows hashed."""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM run_events WHERE hash IS NULL)"):
        return 0
    await conn.execute("ALTER TABLE run_events DISABLE TRIGGER run_events_no_update_delete")
    done = 0
    prev = GENESIS
    async for rows in rows_from(conn, 1, batch):
        updates = []
        for r in rows:
            if r["hash"] is not None:
                prev = r["hash"]
                continue
            digest = link(prev, stored_digest(r))
            updates.append((r["global_position"], prev, digest))
            prev = digest
        if updates:
            await conn.executemany("UPDATE run_events SET prev_hash = $2, hash = $3 WHERE global_position = $1",
                                   updates)
            done += len(updates)
    await conn.execute("ALTER TABLE run_events ENABLE TRIGGER run_events_no_update_delete")
    return done
