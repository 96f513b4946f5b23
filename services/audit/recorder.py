"""The recorder: appends every message of RUN_EVENTS to run_events, idempotently (D1, D3).

global_position is the JetStream stream sequence, so positions are gap-free in commit order.
A batch is written in one transaction and acked only after it commits; a crash before the ack
redelivers the batch, and UNIQUE(event_id) turns the replay into a no-op.

Decoding, two ways to one outcome (see _fast_row for what each checks):
- the fast path, taken by a message that is plainly well formed (the common case): orjson parses
  it and a few type and shape checks, derived from the envelope and the registered payload
  model's JSON Schema, stand in for pydantic's validation of the envelope, and of the payload
  where those checks are all its model asks (else the model validates the payload dict);
- any message the fast path does not accept is decoded by the contracts registry (`decode()`:
  envelope, registered type, upcast, full payload validation), which either accepts it or names
  the reason code it is dead-lettered with.
The fast path may accept less than decode(), never more.

Values PostgreSQL refuses (D4: never lose a message to an exception, never loop on one). A message
can be valid to pydantic and still not storable: NaN and Infinity (pydantic accepts them; JSON and
jsonb do not), a NUL character (`\\u0000` in the payload, or in run_id or another text column), a
timestamp that overflows when converted to UTC. Such a row fails the statement of its whole batch,
and retrying the batch cannot help. So NaN and Infinity are refused while decoding (they are not
JSON), and a batch PostgreSQL refuses is split until the refused rows are isolated (`_refused_rows`): the
rest commits, and each refused message is judged by decode(), dead-lettered with a failure event
and its position accounted in run_event_skipped_positions, like any other message that cannot be
recorded.

The hash chain (D19, services/audit/chain.py). Each row's hash links it to the row before it in
position order, so rows are appended in position order only: a message above a hole (one a dead
recorder held, redelivered when its ack_wait ends) is held in memory, not committed, until the hole
is filled; the acks wait for the hole anyway (app._ack_contiguous). The part of the hash that depends
on the event alone (sha256 of its canonical bytes) is computed while decoding; linking it to the
previous hash, at commit, is one sha256 of 64 bytes per row. What the recorder knows of the chain
(the last hash, the position up to which every position is settled) is read from the database when
it starts and after a failed commit.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError
from orjson import dumps as _dumps_bytes  # C: a third of json's time
from orjson import loads as _loads  # refuses NaN and Infinity (not JSON); see _fast_row for long integers

from contracts.envelope import Envelope
from contracts.reason_codes import is_registered
from contracts.registry import ContractError, decode, registered_types
from services.audit import chain
from services.audit.exactjson import may_hold_long_integer
from services.audit.lease import RecorderLease
from services.common.delivery import dead_letter
from services.common.logging import get_logger

log = get_logger(__name__)

CONSUMER = "audit-recorder"
PRODUCER = "audit"

# The reason code of a message that decodes but holds a value PostgreSQL cannot store (a NUL
# character, a timestamp out of range). NaN and Infinity, the other such values, are refused while
# decoding as not JSON (bus.malformed_message).
UNSTORABLE_REASON = "audit.unstorable_value"

_COLUMNS = (
    "global_position", "event_id", "type", "schema_version", "run_id", "correlation_id",
    "causation_id", "occurred_at", "producer", "severity", "reason_code", "subject", "payload",
)

# A row as the recorder appends it: the event's columns, then its chain links.
_CHAINED_COLUMNS = (*_COLUMNS, "prev_hash", "hash")
# A prepared row is the event's columns then its digest (chain.event_digest): bytes, None (no chain),
# or the exception that computing it raised (a value no row can hold: the row is refused).
_DIGEST = len(_COLUMNS)

# For rows that did not insert: what is already recorded under their event ids.
_RECORDED_BY_ID = """
SELECT event_id, global_position, type, run_id, causation_id FROM run_events WHERE event_id = ANY($1::uuid[])
"""


_ENVELOPE_KEYS = frozenset(("event_id", "type", "schema_version", "run_id", "correlation_id", "causation_id",
                            "occurred_at", "producer", "severity", "reason_code", "payload"))
_SEVERITIES = frozenset(("info", "warning", "error", "critical"))
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})")
# How deep decode() (pydantic's JSON parser) reads nested arrays and objects; it refuses deeper JSON.
# JSON that opens no more brackets than this cannot nest deeper.
_MAX_NESTING = 200
_KIND_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,), "array": (list,),
               "object": (dict,), "null": (type(None),)}


@dataclass(frozen=True)
class _PayloadSpec:
    version: int
    required: frozenset[str]
    fields: dict[str, frozenset[type] | None]  # None: any JSON value
    extra: bool  # whether undeclared fields are allowed
    validate: Callable[[dict], object] | None  # the model's own validation, where the checks above are not all of it


# What a field's JSON Schema may say beyond its kind without the kind check missing anything.
_ANNOTATIONS = frozenset(("title", "description", "default", "examples", "deprecated"))
_SCALARS = frozenset(("string", "integer", "number", "boolean", "null"))


def _has_python_validator(core_schema) -> bool:
    """Whether a pydantic core schema runs Python code anywhere (a field or model validator, an
    Annotated AfterValidator...), which its JSON Schema does not show."""
    if isinstance(core_schema, dict):
        if str(core_schema.get("type", "")).startswith("function-"):
            return True
        return any(_has_python_validator(v) for v in core_schema.values())
    if isinstance(core_schema, list):
        return any(_has_python_validator(v) for v in core_schema)
    return False


def _kind_is_all(schema: dict) -> bool:
    """Whether checking the JSON kind of a value checks everything this field schema asks of it: a
    scalar type (or a union of them) with no constraint (length, pattern, range, enum, format...)."""
    keys = schema.keys() - _ANNOTATIONS
    if keys == {"type"}:
        types = schema["type"]
        return all(t in _SCALARS for t in ([types] if isinstance(types, str) else types))
    if keys == {"anyOf"}:
        return all(_kind_is_all(sub) for sub in schema["anyOf"])
    return False


def _json_kinds(schema: dict, defs: dict) -> set[str] | None:
    """The JSON kinds a JSON Schema admits at its top level; None for any."""
    if "$ref" in schema:
        return _json_kinds(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            kinds: set[str] = set()
            for sub in schema[key]:
                k = _json_kinds(sub, defs)
                if k is None:
                    return None
                kinds |= k
            return kinds
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _json_kinds(schema["allOf"][0], defs)
    values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if values is not None:
        return {_kind_of(v) for v in values}
    types = schema.get("type")
    if types is None:
        return None
    return set([types] if isinstance(types, str) else types)


def _kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "string")


@cache
def payload_specs() -> dict[str, _PayloadSpec]:
    """Per registered type, what the fast path checks of a payload: from its model's JSON Schema
    (validation mode). A type whose schema cannot be generated is left out: decode() judges it."""
    specs = {}
    for name, mt in registered_types().items():
        try:
            schema = mt.model.model_json_schema()
        except Exception:  # noqa: BLE001 - no schema: the slow path judges these messages
            continue
        defs = schema.get("$defs", {})
        fields: dict[str, frozenset[type] | None] = {}
        for field_name, sub in schema.get("properties", {}).items():
            kinds = _json_kinds(sub, defs)
            fields[field_name] = (None if kinds is None or not kinds <= _KIND_TYPES.keys()
                                  else frozenset(t for k in kinds for t in _KIND_TYPES[k]))
        complete = (all(_kind_is_all(sub) for sub in schema.get("properties", {}).values())
                    and not _has_python_validator(mt.model.__pydantic_core_schema__))
        specs[name] = _PayloadSpec(mt.version, frozenset(schema.get("required", ())), fields,
                                   schema.get("additionalProperties", True) is not False,
                                   None if complete else mt.model.model_validate)
    return specs


def _fast_row(seq: int, subject: str, data: bytes, *, chained: bool = True) -> tuple | None:
    """The run_events row of a plainly well-formed message, or None: then decode() decides.

    What it checks:
      JSON - orjson parses it (no NaN or Infinity), it holds no integer beyond 64 bits (which
        orjson would round to a float) and it opens at most _MAX_NESTING arrays and objects (it
        cannot nest deeper than decode() reads).
      envelope - a JSON object with exactly the envelope's keys (extra="forbid"; the defaulted
        ones must be present too, as every publisher writes them); event_id a hyphenated UUID
        string; type registered (which implies its name pattern); schema_version an integer equal
        to the type's current version (an older one needs its upcasters: decode()); run_id and
        correlation_id strings of 1..128 characters, producer 1..64; causation_id null or a UUID
        string; occurred_at an RFC 3339 date-time with Z or a UTC offset (timezone-aware) that
        datetime parses; severity one of the four; reason_code null or a registered code.
      payload - an object checked against its registered model's JSON Schema at the top level:
        every required field present, no undeclared field when the model forbids extras, and each
        field's JSON kind (string, integer, number, boolean, array, object, null) one the schema
        allows.
      model - where those checks are not all the model asks (a nested model, a constraint such as a
        length, pattern, range or enum, a Python validator: every type but a few flat ones such as
        training.progress), the payload dict is validated by its model too, as decode() would.
    So it accepts nothing decode() refuses: an invalid message recorded would be in the append-only
    log for good, and a projection cannot fold it (a run.start whose plan was empty once stopped
    the timeline at its position, D8). What it saves is the envelope's pydantic validation and, for
    the flat types, the payload's.
    """
    if may_hold_long_integer(data):
        return None  # orjson would read an integer beyond 64 bits as a rounded float; decode() keeps it exact
    if data.count(b"[") + data.count(b"{") > _MAX_NESTING:
        return None  # it may nest deeper than decode() reads (orjson reads 1024 levels, writes 254): decode() judges
    try:
        env = _loads(data)
    except ValueError:
        return None
    if type(env) is not dict or env.keys() != _ENVELOPE_KEYS:
        return None
    etype, version, payload = env["type"], env["schema_version"], env["payload"]
    spec = payload_specs().get(etype) if type(etype) is str else None
    if spec is None or type(version) is not int or version != spec.version or type(payload) is not dict:
        return None
    event_id, causation, at = env["event_id"], env["causation_id"], env["occurred_at"]
    run_id, correlation, producer = env["run_id"], env["correlation_id"], env["producer"]
    severity, reason = env["severity"], env["reason_code"]
    if not (type(event_id) is str and _UUID.fullmatch(event_id)
            and (causation is None or (type(causation) is str and _UUID.fullmatch(causation)))
            and type(run_id) is str and 0 < len(run_id) <= 128
            and type(correlation) is str and 0 < len(correlation) <= 128
            and type(producer) is str and 0 < len(producer) <= 64
            and type(severity) is str and severity in _SEVERITIES
            and (reason is None or (type(reason) is str and is_registered(reason)))
            and type(at) is str and _TIMESTAMP.fullmatch(at)):
        return None
    try:
        occurred_at = datetime.fromisoformat(at)
    except ValueError:
        return None
    if spec.validate is not None:  # the model checks all of it
        try:
            spec.validate(payload)
        except ValidationError:
            return None
    else:
        if not spec.required <= payload.keys():
            return None
        fields = spec.fields
        for name, value in payload.items():
            if name in fields:
                allowed = fields[name]
                if allowed is not None and type(value) not in allowed:
                    return None
            elif not spec.extra:
                return None
    if not chained:
        return (seq, event_id, etype, version, run_id, correlation, causation, occurred_at, producer, severity, reason,
                subject, _dumps_bytes(payload).decode(), None)
    canonical = chain.canonical_payload(payload)  # sorted keys: also what is stored (jsonb keeps no order)
    return (seq, event_id, etype, version, run_id, correlation, causation, occurred_at, producer, severity, reason,
            subject, canonical.decode(), _digest(seq, event_id, etype, version, run_id, correlation, causation,
                                                 occurred_at, producer, severity, reason, subject, canonical))


def _digest(*columns) -> bytes | Exception:
    try:
        return chain.event_digest(*columns)
    except (OverflowError, ValueError, TypeError) as exc:  # a timestamp out of range in UTC, a lone surrogate
        return exc


def stream_sequence(m: Msg) -> int:
    """The stream sequence from the ack subject, without building nats-py's Metadata object."""
    reply = m.reply
    if reply and reply.startswith("$JS.ACK."):
        tokens = reply.split(".")
        if len(tokens) == 9:
            return int(tokens[5])
    return m.metadata.sequence.stream


@dataclass
class PreparedBatch:
    msgs: list[Msg]
    rows: list[tuple] = field(default_factory=list)
    bad: list[tuple[Msg, ContractError]] = field(default_factory=list)
    last_position: int = 0
    positions: list[int] = field(default_factory=list)
    fast: int = 0  # rows that came through the fast path


@dataclass
class BatchOutcome:
    appended: int = 0
    already_recorded: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    last_position: int = 0
    conflicts: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # positions whose values PostgreSQL refused
    held: int = 0  # messages above a hole, kept for a later commit


@dataclass(frozen=True)
class _ChainState:
    head: bytes  # the hash of the last row, in position order
    settled: int  # every position up to it is recorded or skipped


class Recorder:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, *, chained: bool = True,
                 lease: RecorderLease | None = None):
        self.pool = pool
        self.js = js
        # The active recorder commits on the connection that holds the recorder lock (services/audit/lease.py):
        # a process that lost it cannot append. Without a lease (tests, tools), on a pooled connection.
        self.lease = lease
        self.chained = chained  # False: rows without hashes (bench/recorder.py measures the chain's cost)
        self._chain: _ChainState | None = None  # None: read it from the database at the next commit
        self._floor = 0  # the consumer's ack floor: positions up to it are settled whatever the tables say
        # Messages above a hole, by position: ("row", row, msg) or ("bad", ContractError, msg).
        self._held: dict[int, tuple] = {}
        payload_specs()  # the fast path's checks come from pydantic's JSON Schemas: build them now, not on the first batch

    def settled_up_to(self, ack_floor: int) -> None:
        """Every position up to the consumer's ack floor is settled (recorded, skipped, or before the
        stream's first message): the chain does not wait for those."""
        self._floor = ack_floor
        self._chain = None

    async def record(self, msgs: list[Msg]) -> BatchOutcome:
        return await self.commit(self.prepare(msgs))

    def prepare(self, msgs: list[Msg], *, full_decode: bool = False) -> PreparedBatch:
        """Decode a batch into rows (CPU only, no I/O)."""
        chained = self.chained
        batch = PreparedBatch(msgs)
        batch.positions = positions = [stream_sequence(m) for m in msgs]
        batch.last_position = max(positions, default=0)
        rows, bad = batch.rows, batch.bad
        for m, seq in zip(msgs, positions):
            if not full_decode:
                row = _fast_row(seq, m.subject, m.data, chained=chained)
                if row is not None:
                    rows.append(row)
                    batch.fast += 1
                    continue
            try:
                env, _ = decode(m.data)
                payload = _payload_json(env.payload)
            except ContractError as exc:
                bad.append((m, exc))
                continue
            columns = (seq, env.event_id, env.type, env.schema_version, env.run_id, env.correlation_id,
                       env.causation_id, env.occurred_at, env.producer, env.severity.value, env.reason_code,
                       m.subject)
            try:
                digest = _digest(*columns, chain.canonical_payload(env.payload)) if chained else None
            except (TypeError, ValueError) as exc:
                digest = exc
            rows.append((*columns, payload, digest))
        return batch

    async def commit(self, batch: PreparedBatch) -> BatchOutcome:
        """Append a prepared batch in one transaction, then dead-letter what could not be recorded.

        The caller acks the batch after this returns: after the commit and the dead letters."""
        out = BatchOutcome(last_position=batch.last_position)
        async with (self.lease.connection() if self.lease is not None else self.pool.acquire()) as conn:
            try:
                dead = await self._commit_rows(conn, batch, out)
            except BaseException:
                self._chain = None  # the transaction may have committed or not: read the chain again
                raise
        for m, reason_code, error, env in dead:
            await dead_letter(self.js, m, consumer=CONSUMER, producer=PRODUCER, reason_code=reason_code, error=error,
                              envelope=env)
            out.dead_lettered += 1
        return out

    async def _load_chain(self, conn: asyncpg.Connection) -> _ChainState:
        r = await conn.fetchrow(
            "SELECT (SELECT hash FROM run_events ORDER BY global_position DESC LIMIT 1) AS head,"
            " greatest((SELECT coalesce(max(global_position), 0) FROM run_events),"
            "          (SELECT coalesce(max(global_position), 0) FROM run_event_skipped_positions)) AS settled")
        return _ChainState(r["head"] or chain.GENESIS, max(r["settled"], self._floor))

    async def _commit_rows(self, conn: asyncpg.Connection, batch: PreparedBatch,
                           out: BatchOutcome) -> list[tuple[Msg, str, str, Envelope | None]]:
        """The batch's transaction: its rows, and a skipped-position row for each message it cannot
        record. Returns those messages, to dead-letter once the transaction has committed."""
        dead: list[tuple[Msg, str, str, Envelope | None]] = []
        skipped: list[tuple] = []
        by_seq = dict(zip(batch.positions, batch.msgs, strict=True))
        async with conn.transaction():
            state = self._chain or await self._load_chain(conn)
            pending = dict(self._held)  # a redelivery of a held message replaces it
            below_rows, below_bad = [], []
            for row in batch.rows:
                if row[0] <= state.settled:
                    below_rows.append(row)
                else:
                    pending[row[0]] = ("row", row, by_seq[row[0]])
            for m, exc in batch.bad:
                pos = stream_sequence(m)
                if pos <= state.settled:
                    below_bad.append((m, exc))
                else:
                    pending[pos] = ("bad", exc, m)
            # What this transaction settles above the chain: the positions that follow it without a hole.
            settled, ready_rows, ready_bad = state.settled, [], []
            while settled + 1 in pending:
                settled += 1
                kind, thing, m = pending.pop(settled)
                if kind == "row":
                    ready_rows.append((thing, m))
                else:
                    ready_bad.append((m, thing))
            out.held = len(pending)
            for m, exc in below_bad + ready_bad:
                dead.append((m, exc.reason_code, str(exc), None))
                skipped.append((stream_sequence(m), exc.reason_code, None, str(exc)[:500]))
            head = state.head
            if below_rows:
                await self._settle_below(conn, below_rows, by_seq, out, skipped, dead)
            if ready_rows:
                msg_of = {row[0]: m for row, m in ready_rows}
                inserted, refused, clashing, head = await _append_chained(conn, [r for r, _ in ready_rows], head)
                out.appended += len(inserted)
                for row, exc in refused:
                    m = msg_of[row[0]]
                    reason_code, error, env = _judge_refused(m, exc)
                    out.refused.append(row[0])
                    skipped.append((row[0], reason_code, _as_uuid(row[1]), error[:500]))
                    dead.append((m, reason_code, error, env))
                if clashing:
                    await self._explain(conn, clashing, msg_of, out, skipped, dead)
            if skipped:
                await _skip(conn, skipped)
        out.refused.sort()
        self._chain = _ChainState(head, settled)
        self._held = pending
        return sorted(dead, key=lambda d: stream_sequence(d[0]))

    async def _explain(self, conn, rows: list[tuple], msg_of: dict, out: BatchOutcome, skipped: list,
                       dead: list) -> None:
        recorded = {r["event_id"]: r for r in await conn.fetch(_RECORDED_BY_ID, [r[1] for r in rows])}
        for pos, code, event_id, detail in self._explain_not_inserted(rows, recorded, out):
            skipped.append((pos, code, event_id, detail))
            if code == "audit.event_id_conflict":
                dead.append((msg_of[pos], code, detail, None))

    async def _settle_below(self, conn: asyncpg.Connection, rows: list[tuple], by_seq: dict, out: BatchOutcome,
                            skipped: list, dead: list) -> None:
        """Rows at positions the chain has passed: redeliveries of what is recorded or skipped already (a
        recorder that died before its ack). A message skipped before is dead-lettered again (idempotent:
        its predecessor may have died before doing so). A position neither recorded nor skipped is a
        hole left by a recorder older than the chain: that row is appended after its predecessor in
        position order, and `tuneline audit verify` will report the link after it."""
        positions = [r[0] for r in rows]
        recorded = {r[0] for r in await conn.fetch(
            "SELECT global_position FROM run_events WHERE global_position = ANY($1::bigint[])", positions)}
        was_skipped = {r[0]: r for r in await conn.fetch(
            "SELECT global_position, reason_code, detail FROM run_event_skipped_positions"
            " WHERE global_position = ANY($1::bigint[])", positions)}
        explain = [r for r in rows if r[0] in recorded]
        if explain:
            await self._explain(conn, explain, by_seq, out, skipped, dead)
        for row in rows:
            if row[0] in was_skipped:
                s = was_skipped[row[0]]
                if s["reason_code"] != "audit.duplicate_event":
                    dead.append((by_seq[row[0]], s["reason_code"], s["detail"], None))
            elif row[0] not in recorded:
                prev = await conn.fetchval("SELECT hash FROM run_events WHERE global_position < $1"
                                           " ORDER BY global_position DESC LIMIT 1", row[0])
                log.warning("recorder_chain_late_row", position=row[0])
                inserted, refused, clashing, _ = await _append_chained(conn, [row], prev or chain.GENESIS)
                out.appended += len(inserted)
                for r, exc in refused:
                    reason_code, error, env = _judge_refused(by_seq[r[0]], exc)
                    out.refused.append(r[0])
                    skipped.append((r[0], reason_code, _as_uuid(r[1]), error[:500]))
                    dead.append((by_seq[r[0]], reason_code, error, env))
                if clashing:
                    await self._explain(conn, clashing, by_seq, out, skipped, dead)

    @staticmethod
    def _explain_not_inserted(rows: list[tuple], recorded: dict, out: BatchOutcome) -> list[tuple]:
        """A row that did not insert is a redelivery (same position), a duplicate re-published
        after the dedup window (same identity, new position), or a conflict (another event)."""
        skipped = []
        for pos, event_id, etype, _v, run_id, _c, causation, *_ in rows:
            event_id, causation = _as_uuid(event_id), _as_uuid(causation)  # fast-path rows carry strings
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


def _as_uuid(value: uuid.UUID | str | None) -> uuid.UUID | None:
    return uuid.UUID(value) if isinstance(value, str) else value


def _payload_json(payload: dict) -> str:
    """The payload as JSON text for jsonb, refusing what is not JSON.

    pydantic accepts NaN and Infinity (and reads a number too large for a double as Infinity);
    json.dumps would write them as bare NaN/Infinity tokens, which jsonb refuses. An integer too long
    for Python to print (over 4300 digits) cannot be written either."""
    try:
        return json.dumps(payload, allow_nan=False)
    except ValueError as exc:
        raise ContractError("bus.malformed_message", f"payload is not storable JSON: {exc}") from exc


def _judge_refused(m: Msg, exc: Exception) -> tuple[str, str, Envelope | None]:
    """Why a message PostgreSQL refused cannot be recorded: what decode() finds wrong with it, if
    anything (the fast path checks less), else the refused value itself."""
    try:
        env, _ = decode(m.data)
    except ContractError as err:
        return err.reason_code, str(err), None
    detail = getattr(exc, "detail", None)
    return (UNSTORABLE_REASON, f"PostgreSQL cannot store a value of this {env.type}: {exc}"
            + (f" ({detail})" if detail else ""), env)


# Errors that a row's values cause, as opposed to the connection or the server: PostgreSQL refusing
# a value (SQLSTATE class 22, data exception: a NUL character, an invalid escape in jsonb), asyncpg
# unable to encode one (a timestamp that overflows when converted to UTC, a lone surrogate).
_VALUE_ERRORS = (asyncpg.DataError, OverflowError, UnicodeEncodeError)


def _linked(rows: list[tuple], prev: bytes) -> tuple[list[tuple], bytes]:
    """The rows with their chain links, in position order, and the last hash."""
    out = []
    for row in rows:
        digest = row[_DIGEST]
        if digest is None:  # no chain (the bench's baseline)
            out.append((*row[:_DIGEST], None, None))
            continue
        h = chain.link(prev, digest)
        out.append((*row[:_DIGEST], prev, h))
        prev = h
    return out, prev


async def _append_chained(conn: asyncpg.Connection, rows: list[tuple],
                          prev: bytes) -> tuple[list[tuple], list[tuple[tuple, Exception]], list[tuple], bytes]:
    """Append rows (in position order) linked from `prev`; returns (the rows inserted, the rows refused for
    their values with the error each caused, the rows that clash with a recorded event id or position,
    the last hash).

    The common case (all new) is one COPY, as fast as PostgreSQL takes rows. Otherwise the clashing or
    refused rows are found (in savepoints), taken out, and the rest linked again and appended: a row
    left out must not be in the chain. Any other error (a lost connection) is raised.
    """
    refused = [(r, r[_DIGEST]) for r in rows if isinstance(r[_DIGEST], Exception)]
    clashing: list[tuple] = []
    rows = [r for r in rows if not isinstance(r[_DIGEST], Exception)]
    while rows:
        linked, head = _linked(rows, prev)
        try:
            async with conn.transaction():
                await conn.copy_records_to_table("run_events", records=linked, columns=_CHAINED_COLUMNS)
            return rows, refused, clashing, head
        except asyncpg.UniqueViolationError:
            out = await _clashing(conn, rows)
            if not out:
                raise
            clashing += out
        except _VALUE_ERRORS:
            out_refused = await _refused_rows(conn, linked, rows)
            if not out_refused:
                raise
            refused += out_refused
            out = [r for r, _ in out_refused]
        gone = {r[0] for r in out}
        rows = [r for r in rows if r[0] not in gone]
    return [], refused, clashing, prev


async def _clashing(conn: asyncpg.Connection, rows: list[tuple]) -> list[tuple]:
    """Rows whose event id or position is recorded already, or whose event id an earlier row of the batch has."""
    taken_ids = {r[0] for r in await conn.fetch("SELECT event_id FROM run_events WHERE event_id = ANY($1::uuid[])",
                                                [r[1] for r in rows])}
    taken_positions = {r[0] for r in await conn.fetch(
        "SELECT global_position FROM run_events WHERE global_position = ANY($1::bigint[])", [r[0] for r in rows])}
    seen, out = set(), []
    for r in rows:
        event_id = _as_uuid(r[1])
        if event_id in taken_ids or r[0] in taken_positions or event_id in seen:
            out.append(r)
        seen.add(event_id)
    return out


class _RollBack(Exception):
    pass


async def _refused_rows(conn: asyncpg.Connection, linked: list[tuple],
                        rows: list[tuple]) -> list[tuple[tuple, Exception]]:
    """The rows PostgreSQL refuses for their values, with the error each caused: halves are appended in
    savepoints, each rolled back, down to the single rows that fail (one bad row in 2,000 costs about 22
    statements)."""
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("run_events", records=linked, columns=_CHAINED_COLUMNS)
            raise _RollBack
    except _RollBack:
        return []
    except asyncpg.UniqueViolationError:
        if len(rows) == 1:
            return []
    except _VALUE_ERRORS as exc:
        if len(rows) == 1:
            return [(rows[0], exc)]
    mid = len(rows) // 2
    return (await _refused_rows(conn, linked[:mid], rows[:mid])
            + await _refused_rows(conn, linked[mid:], rows[mid:]))


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
