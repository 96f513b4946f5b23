"""Re-driving one service's durable consumer from a stream position (`tuneline replay consumer DURABLE --from
SEQ|TIME [--sandbox]`).

In place: the durable is rewound (JetStream cannot move a consumer's start, so it is deleted and made again
with the same configuration and a start sequence or time) and the running service takes every message of its
subject again from there. Handlers are idempotent (D3): what a message caused before is re-published under the
same derived ids and deduplicated, and whatever a fixed handler now does differently is new.

In a sandbox: nothing live changes. A nats-server and a database of their own are started; the recorded
messages of the consumer's subject from the position are published there (with the context a handler reads
from the bus: the frozen test sets and registry log recorded before the first of them, and the serving bucket
folded from run_events at that point), a copy of the service runs on it in this process, and once its
outputs settle they are recorded into the sandbox database by the recorder's code and compared, by event id
(ids derive from the trigger, D3), with what run_events says that consumer emitted for the same messages:
events only in history, only in the replay, or changed (type, severity, reason code, payload less the
measurements of time that no two runs share). This is how a new evaluator or gate is tried on past traffic
before it is deployed. The copy reads and writes the live artifact store (content-addressed: what it
writes is new files, never a changed one).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import tempfile
import time
import typing
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.errors import ReasonCodedError
from services.audit import exactjson
from services.common.delivery import ConsumerSpec
from services.common.logging import get_logger

log = get_logger(__name__)

STAGES = ("ingest", "prep", "trainer", "evaluator", "export", "registry")
# Payload keys that measure time or speed (with any key starting "latency" or ending "_s"): they differ
# between any two runs of the same handler.
VOLATILE = frozenset(("wall_s", "latency_ms", "latency_s", "latency_ms_median", "latency_ms_p95", "examples_per_s",
                      "tokens_per_s", "eta_s", "elapsed_s", "duration_s", "occurred_at", "started_at", "ended_at",
                      "seconds", "rows_per_s"))
_SAMPLES = 10


class ConsumerReplayRefused(ReasonCodedError):
    """A consumer replay that cannot start (an unknown durable, a position outside the stream)."""


@dataclass
class ConsumerReport:
    durable: str
    mode: str
    from_sequence: int | None = None
    from_time: str | None = None
    inputs: int = 0
    outputs: int = 0
    differences: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    sandbox: str | None = None  # the sandbox database's name, kept for a look
    wall_s: float = 0.0

    @property
    def identical(self) -> bool:
        return not any(self.differences.values())

    @property
    def outcome(self) -> str:
        if self.mode == "in_place":
            return "redriven"
        return "identical" if self.identical else "differs"


def parse_position(text: str) -> int | datetime:
    """A stream sequence (>= 1) or an ISO 8601 time (UTC unless it names an offset)."""
    text = text.strip()
    if text.isdigit():
        if int(text) < 1:
            raise ConsumerReplayRefused("audit.replay_position_invalid", "a stream sequence starts at 1")
        return int(text)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConsumerReplayRefused("audit.replay_position_invalid",
                                    f"{text!r} is neither a stream sequence nor an ISO 8601 time") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def consumer_spec(durable: str) -> tuple[object, ConsumerSpec]:
    """(the service's app module, the ConsumerSpec) declaring `durable`: a stage's durables start with it."""
    stage = durable.split("-", 1)[0]
    if stage in STAGES:
        module = importlib.import_module(f"services.{stage}.app")
        for value in vars(module).values():
            if isinstance(value, ConsumerSpec) and value.durable == durable:
                return module, value
    raise ConsumerReplayRefused("audit.replay_consumer_unknown",
                                f"no service declares a durable consumer {durable!r} (they start with the stage: "
                                f"{', '.join(s + '-...' for s in STAGES)})")


def _like(subject: str) -> str:
    """A NATS subject filter as a LIKE pattern over run_events.subject (`*` one token, `>` the rest)."""
    out = subject.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return out.replace("*", "%").replace(">", "%")


def _matches(filter_subject: str, subject: str) -> bool:
    f, s = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(f):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(f) == len(s)


_ROW = """SELECT global_position, event_id, type, schema_version, run_id, correlation_id, causation_id, occurred_at,
       producer, severity, reason_code, subject, payload::text AS payload FROM run_events"""


async def recorded_inputs(conn: asyncpg.Connection, spec: ConsumerSpec, start: int | datetime) -> list:
    """The recorded messages the consumer took (its subject, the types it accepts) from the position."""
    where = "global_position >= $3" if isinstance(start, int) else "occurred_at >= $3"
    rows = await conn.fetch(f"{_ROW} WHERE subject LIKE $1 ESCAPE '\\' AND type = ANY($2::text[]) AND {where} "
                            "ORDER BY global_position", _like(spec.subject), list(spec.accepts), start)
    return [r for r in rows if _matches(spec.subject, r["subject"])]


async def recorded_outputs(conn: asyncpg.Connection, service: str, inputs: list) -> list:
    """What run_events says the service emitted for `inputs`: events it produced caused by one of them, or by
    one of those (a handler's later events may name its earlier ones)."""
    causes = [r["event_id"] for r in inputs]
    out, seen = [], set(causes)
    while causes:
        rows = await conn.fetch(f"{_ROW} WHERE causation_id = ANY($1::uuid[]) AND producer = $2 "
                                "ORDER BY global_position", causes, service)
        rows = [r for r in rows if r["event_id"] not in seen]
        seen.update(r["event_id"] for r in rows)
        out += rows
        causes = [r["event_id"] for r in rows]
    return out


def envelope_bytes(r) -> bytes:
    """A run_events row as the message its producer published (the envelope, the payload as recorded)."""
    def text(v):
        return None if v is None else str(v)

    head = {"event_id": str(r["event_id"]), "type": r["type"], "schema_version": r["schema_version"],
            "run_id": r["run_id"], "correlation_id": r["correlation_id"], "causation_id": text(r["causation_id"]),
            "occurred_at": r["occurred_at"].isoformat(), "producer": r["producer"], "severity": r["severity"],
            "reason_code": r["reason_code"]}
    return (json.dumps(head)[:-1] + ', "payload": ' + r["payload"] + "}").encode()


def _volatile(key: str) -> bool:
    return key in VOLATILE or key.startswith("latency") or key.endswith("_s")


def _normal(value, artifacts: dict):
    """The value less its measurements of time; an artifact (a JSONL file: per-row records, outputs) is
    compared by its rows, normalised the same way, since a row's latency changes its sha256."""
    if isinstance(value, dict):
        if "sha256" in value and "uri" in value:
            return _artifact(value, artifacts)
        return {k: _normal(v, artifacts) for k, v in value.items() if not _volatile(k)}
    if isinstance(value, list):
        return [_normal(v, artifacts) for v in value]
    return value


def _artifact(ref: dict, artifacts: dict):
    sha = ref["sha256"]
    if sha not in artifacts:
        artifacts[sha] = ("artifact", sha)  # unreadable, or not JSONL: compared by its digest
        try:
            from contracts.common import ArtifactRef
            from services.common.jsonl import loads_jsonl
            from services.common.run_artifacts import store_of

            r = ArtifactRef.model_validate(ref)
            rows = loads_jsonl(store_of(r).read_bytes(r))
            artifacts[sha] = ("artifact rows", _normal(rows, artifacts))
        except Exception:  # noqa: BLE001 - any failure to read it leaves the digest to compare
            pass
    return artifacts[sha]


def _comparable(r, artifacts: dict) -> tuple:
    return (r["type"], r["severity"], r["reason_code"], r["run_id"], _normal(exactjson.loads(r["payload"]), artifacts))


def diff_outputs(recorded: list, replayed: list) -> tuple[dict[str, int], list[str]]:
    """By event id: only in history, only in the replay, changed."""
    a = {str(r["event_id"]): r for r in recorded}
    b = {str(r["event_id"]): r for r in replayed}
    counts = {"only_recorded": 0, "only_replayed": 0, "changed": 0}
    samples: list[str] = []

    def note(kind, text):
        counts[kind] += 1
        if len(samples) < _SAMPLES:
            samples.append(f"{kind}: {text}"[:400])

    for eid in sorted(a.keys() - b.keys(), key=lambda e: a[e]["global_position"]):
        note("only_recorded", f"{a[eid]['type']} {eid} of run {a[eid]['run_id']} (position {a[eid]['global_position']})")
    for eid in sorted(b.keys() - a.keys(), key=lambda e: b[e]["global_position"]):
        note("only_replayed", f"{b[eid]['type']} {eid} of run {b[eid]['run_id']}")
    artifacts: dict = {}
    for eid in sorted(a.keys() & b.keys(), key=lambda e: a[e]["global_position"]):
        x, y = _comparable(a[eid], artifacts), _comparable(b[eid], artifacts)
        if x != y:
            note("changed", f"{a[eid]['type']} {eid} of run {a[eid]['run_id']}: {_first_difference(x, y)}")
    return counts, samples


def _first_difference(x: tuple, y: tuple) -> str:
    names = ("type", "severity", "reason_code", "run_id")
    for name, u, v in zip(names, x, y):
        if u != v:
            return f"{name} {u!r} -> {v!r}"

    def walk(u, v, path):
        if isinstance(u, dict) and isinstance(v, dict):
            for k in sorted(u.keys() | v.keys()):
                if u.get(k) != v.get(k):
                    return walk(u.get(k), v.get(k), f"{path}.{k}")
        if isinstance(u, (list, tuple)) and isinstance(v, (list, tuple)) and len(u) == len(v):
            for i, (p, q) in enumerate(zip(u, v)):
                if p != q:
                    return walk(p, q, f"{path}[{i}]")
        return f"{path}: {json.dumps(u, default=str)[:120]} -> {json.dumps(v, default=str)[:120]}"

    return walk(x[4], y[4], "payload")


# --- in place -----------------------------------------------------------------------------------------


async def redrive_in_place(nats_url: str, dsn: str, durable: str, start: int | datetime) -> ConsumerReport:
    """Rewind the live durable to `start`: same configuration, a new start; the running service re-takes."""
    began = time.perf_counter()
    _, spec = consumer_spec(durable)
    report = ConsumerReport(durable, "in_place", start if isinstance(start, int) else None,
                            None if isinstance(start, int) else start.isoformat())
    conn = await asyncpg.connect(dsn)
    try:
        report.inputs = len(await recorded_inputs(conn, spec, start))
    finally:
        await conn.close()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.consumer_info(subjects.STREAM, durable)
        except NotFoundError:
            raise ConsumerReplayRefused("audit.replay_consumer_unknown",
                                        f"{durable} does not exist on the server: start the {spec.service} service "
                                        "once (it makes its consumers)") from None
        stream = await js.stream_info(subjects.STREAM)
        if isinstance(start, int) and start > stream.state.last_seq:
            raise ConsumerReplayRefused("audit.replay_position_invalid",
                                        f"sequence {start} is past the stream's last ({stream.state.last_seq})")
        cfg: ConsumerConfig = info.config
        if isinstance(start, int):
            new = cfg.evolve(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start, opt_start_time=None)
        else:
            new = cfg.evolve(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_seq=None,
                             opt_start_time=start.astimezone(UTC).isoformat().replace("+00:00", "Z"))
        await js.delete_consumer(subjects.STREAM, durable)
        await js.add_consumer(subjects.STREAM, new)
    finally:
        await nc.close()
    report.wall_s = time.perf_counter() - began
    log.info("consumer_redriven", durable=durable, start=str(start), inputs=report.inputs)
    return report


# --- sandbox ------------------------------------------------------------------------------------------


def _sibling_db(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def _settings_for(module, nats_url: str, data_dir: Path | None):
    """The service's settings (its own knobs from the environment, as deployed) on the sandbox's server."""
    hints = typing.get_type_hints(module.build)
    cls = next(a for a in typing.get_args(hints["settings"]) if a is not type(None))
    return cls(nats_url=nats_url, nats_user=None, nats_password=None,
               **({"data_dir": data_dir} if data_dir is not None else {}))


async def _context(conn: asyncpg.Connection, first: int) -> list:
    """What a handler reads from the bus besides its trigger, as recorded before the first input."""
    return await conn.fetch(f"{_ROW} WHERE (subject LIKE 'tuneline.evt.testset.%' OR subject LIKE "
                            "'tuneline.evt.registry.%') AND global_position < $1 ORDER BY global_position", first)


async def _publish_rows(js, rows, on_batch=None) -> None:
    for r in rows:
        await js.publish(r["subject"], envelope_bytes(r), headers={"Nats-Msg-Id": str(r["event_id"])})
        if on_batch is not None:
            on_batch(1, r["global_position"])


async def _settle(js, durable: str, settle_s: float, timeout_s: float) -> None:
    """Until the consumer has nothing pending or unacked and the stream has not grown for `settle_s`."""
    deadline = time.monotonic() + timeout_s
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        try:
            c = await js.consumer_info(subjects.STREAM, durable)
            busy = c.num_pending or c.num_ack_pending
        except NotFoundError:
            busy = True  # not made yet
        seq = (await js.stream_info(subjects.STREAM)).state.last_seq
        if seq != last or busy:
            last, quiet_since = seq, time.monotonic()
        elif time.monotonic() - quiet_since >= settle_s:
            return
    raise TimeoutError(f"the sandboxed {durable} did not settle within {timeout_s:.0f}s")


async def replay_in_sandbox(nats_url: str, dsn: str, durable: str, start: int | datetime, *,
                            sandbox_db: str | None = None, data_dir: Path | None = None, settle_s: float = 10.0,
                            timeout_s: float = 3600.0, on_total=None, on_batch=None) -> ConsumerReport:
    """Feed the recorded inputs of `durable` from `start` to a copy of its service on a sandbox stream and
    database, and diff what it emits with what history says it emitted. Nothing live is written."""
    from services.audit.migrate import migrate
    from services.audit.replay_serving import rebuilt_entries
    from services.audit.replay_store import record_stream
    from services.cli.stack import start_nats  # the embedded nats-server, as `tuneline up` starts it
    from services.common.bus import declare_streams
    from services.common.serving import serving_bucket

    began = time.perf_counter()
    module, spec = consumer_spec(durable)
    report = ConsumerReport(durable, "sandbox", start if isinstance(start, int) else None,
                            None if isinstance(start, int) else start.isoformat())
    conn = await asyncpg.connect(dsn)
    try:
        inputs = await recorded_inputs(conn, spec, start)
        if not inputs:
            raise ConsumerReplayRefused("audit.replay_position_invalid",
                                        f"no recorded message of {spec.subject} from {start}: nothing to replay")
        recorded = await recorded_outputs(conn, spec.service, inputs)
        context = await _context(conn, inputs[0]["global_position"])
        serving_then = await rebuilt_entries(conn, inputs[0]["global_position"] - 1)
    finally:
        await conn.close()
    report.inputs = len(inputs)
    if on_total is not None:
        on_total(len(context) + len(inputs))

    created_db = sandbox_db is None
    sandbox_db = sandbox_db or _sibling_db(dsn, f"sandbox_{uuid.uuid4().hex[:10]}")
    if created_db:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{urlsplit(sandbox_db).path.strip("/")}"')
        finally:
            await admin.close()
    await migrate(sandbox_db)
    with tempfile.TemporaryDirectory(prefix="tuneline-sandbox-") as tmp:
        server = start_nats(Path(tmp) / "nats")
        try:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await declare_streams(js)
                kv = await serving_bucket(js)
                for target, entry in serving_then.items():
                    await kv.put(target, json.dumps(entry, sort_keys=True).encode())
                await _publish_rows(js, context, on_batch)
                svc = module.build(_settings_for(module, server.url, data_dir))
                await svc.prepare_broker()
                await svc.broker.start()
                try:
                    await _publish_rows(js, inputs, on_batch)
                    await _settle(js, durable, settle_s, timeout_s)
                finally:
                    with contextlib.suppress(Exception):
                        await svc.broker.stop()
            finally:
                await nc.close()
            await record_stream(server.url, sandbox_db)
        finally:
            server.stop()
    conn = await asyncpg.connect(sandbox_db)
    try:
        fed = [r["event_id"] for r in context] + [r["event_id"] for r in inputs]
        replayed = await conn.fetch(f"{_ROW} WHERE producer = $1 AND NOT event_id = ANY($2::uuid[]) "
                                    "ORDER BY global_position", spec.service, fed)
    finally:
        await conn.close()
    report.outputs = len(replayed)
    report.sandbox = urlsplit(sandbox_db).path.strip("/")
    report.differences, report.samples = diff_outputs(recorded, replayed)
    report.wall_s = time.perf_counter() - began
    log.info("consumer_replayed_in_sandbox", durable=durable, inputs=report.inputs, outputs=report.outputs,
             sandbox_db=urlsplit(sandbox_db).path.strip("/"), **report.differences)
    return report
