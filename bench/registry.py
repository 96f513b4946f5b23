"""Registry benchmark (D7, D17): racing commands on one target, point-in-time answers on a long log, and
how soon the `serving` bucket follows a promotion.

    python -m bench.registry [--rounds 50] [--versions 1000]

- races: `--rounds` rounds of 3 commands (promote A, promote B, rollback) decided on the same state and
  fired at once at two competing registry processes: winners per round, and half-applied states counted
  from the log afterwards (a round that appended other than one event, a promotion that did not demote
  what was production, a state with other than one production version);
- `serving --at` latency: run_events folded up to a time, on a target with `--versions` versions;
- `history` latency: the History projection's read for that target (what `tuneline history` does), once the
  projection has caught up on those versions' events;
- KV lag: from a promotion's stream timestamp to its `serving` entry's (both server clocks).

Prints a table and writes bench/results/registry.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats

from contracts import subjects
from contracts.commands import PromoteVersion, RestoreVersion, RollBackTarget
from contracts.envelope import Envelope
from contracts.events import ClassificationMetrics, ExportCompleted, GateVerdict, VersionPromoted, VersionRegistered
from contracts.registry import message_type_of
from services.audit.app import AuditService
from services.audit.db import app_dsn, connect_as_app
from services.audit.migrate import migrate
from services.audit.settings import AuditSettings
from services.cli.history_cmds import read_history
from services.cli.registry_cmds import Refused, send, serving_at
from services.cli.stack import start_nats, start_postgres, stop_postgres
from services.common.bus import declare_streams, publish
from services.registry import serving
from services.registry.app import build
from services.registry.domain import fold
from services.registry.log import read_target, target_events
from services.registry.settings import RegistrySettings
from tests.factories import plan, ref

RESULTS = Path(__file__).resolve().parent / "results"
M = ClassificationMetrics(accuracy=0.9, macro_f1=0.9, n=100)


def env_of(payload, run_id: str, at: datetime | None = None) -> Envelope:
    mt = message_type_of(payload)
    return Envelope(type=mt.name, schema_version=mt.version, run_id=run_id, correlation_id=run_id, producer="bench",
                    payload=payload.model_dump(mode="json"), **({"occurred_at": at} if at else {}))


async def wait(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met")


async def races(js, rounds: int) -> dict:
    t = "bench-race"
    for i in range(1, 5):
        gate = GateVerdict(event_id=str(uuid.uuid4()), passed=True, n=100, delta=0.1, p_value=0.01)
        e = env_of(ExportCompleted(plan=plan(t), base_model="m", export=ref(f"x{i}"), format="f", files={}, candidate=M,
                                   base=M, gate=gate), f"run-{i}")
        await publish(js, e, subjects.subject_for(e.type, kind="event"))

    async def four_validated():
        s = await read_target(js, t)
        return len(s.versions) == 4 and all(v.status == "validated" for v in s.versions.values())

    await wait(four_validated)
    actor = dict(actor="bench", reason="bench")
    await send(js, PromoteVersion(target=t, version="1", **actor))
    await send(js, PromoteVersion(target=t, version="2", **actor))
    winners, appended, seconds = [], [], []
    for _ in range(rounds):
        before = await read_target(js, t)
        cmds = [PromoteVersion(target=t, version="3", **actor), PromoteVersion(target=t, version="4", **actor),
                RollBackTarget(target=t, **actor)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(send(js, c.model_copy(update={"expected_sequence": before.last_sequence}))
                                         for c in cmds), return_exceptions=True)
        seconds.append(time.perf_counter() - t0)
        unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, Refused)]
        if unexpected:
            raise unexpected[0]
        winners.append(sum(not isinstance(r, BaseException) for r in results))
        appended.append(len(await target_events(js, t, after=before.last_sequence)))
        s = await read_target(js, t)  # back to v2 in production with a previous production, so all three apply
        if s.production.version != 2:
            await send(js, RestoreVersion(target=t, version="2", **actor))
        if len(s.history) < 2 or s.production.version == 1:
            await send(js, RestoreVersion(target=t, version="2", **actor))
    half = half_applied([e for _, e in await target_events(js, t) if e], t) + sum(n != 1 for n in appended)
    return {"rounds": rounds, "winners_per_round": dict(sorted(
        {w: winners.count(w) for w in set(winners)}.items())), "half_applied": half,
        "round_s_median": statistics.median(seconds)}


def half_applied(events: list[dict], target: str) -> int:
    """States in the log that are not whole: other than one production version after a production event,
    or a promotion/restore/rollback that did not demote what was production."""
    bad, prefix = 0, []
    for e in events:
        before = fold(target, [(i + 1, x) for i, x in enumerate(prefix)])
        prefix.append(e)
        if e["type"] in ("registry.promoted", "registry.restored", "registry.rolled_back"):
            was = before.production.version if before.production else None
            if e["payload"].get("demoted") != was:
                bad += 1
            after = fold(target, [(i + 1, x) for i, x in enumerate(prefix)])
            if sum(v.status == "production" for v in after.versions.values()) != 1:
                bad += 1
    return bad


async def long_target(js, conn, versions: int) -> dict:
    """A target with `versions` versions, each promoted an hour after the last; serving --at and history timed."""
    t = "bench-long"
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    last = 0
    for v in range(1, versions + 1):
        at = t0 + timedelta(hours=v)
        reg = env_of(VersionRegistered(target=t, version=v, export=ref(f"l{v}"), base_model="m", candidate=M, base=M,
                                       source_run_id=f"run-l{v}"), f"run-l{v}", at)
        pro = env_of(VersionPromoted(target=t, version=v, demoted=v - 1 or None, actor="bench", reason="bench"),
                     f"run-l{v}", at + timedelta(minutes=1))
        for e in (reg, pro):
            last = (await publish(js, e, subjects.subject_for(e.type, kind="event", target=t))).seq

    async def recorded():
        return await conn.fetchval("SELECT count(*) > 0 FROM run_events WHERE global_position = $1", last)

    await wait(recorded, timeout=300)
    timings = []
    for k in range(20):
        v = 1 + (k * 37) % versions
        at = t0 + timedelta(hours=v, minutes=30)
        s0 = time.perf_counter()
        answer = await serving_at(conn, t, at)
        timings.append((time.perf_counter() - s0) * 1000)
        assert answer["serving"]["version"] == v, (answer["serving"]["version"], v)
    timings.sort()

    async def projected():  # History is projected from run_events by the audit service's projector
        return await conn.fetchval("SELECT coalesce(max(position), 0) >= $1 FROM projection_checkpoints "
                                   "WHERE projection = 'history'", last)

    await wait(projected, timeout=300)
    history = []
    for _ in range(20):
        s0 = time.perf_counter()
        answer = await read_history(conn, t)
        history.append((time.perf_counter() - s0) * 1000)
        assert len(answer["runs"]) == versions, len(answer["runs"])
        assert sum(r["status"] == "production" for r in answer["runs"]) == 1
    history.sort()
    return {"versions": versions, "events": 2 * versions, "serving_at_ms_median": statistics.median(timings),
            "serving_at_ms_p95": timings[int(0.95 * (len(timings) - 1))],
            "history_ms_median": statistics.median(history), "history_ms_p95": history[int(0.95 * (len(history) - 1))]}


async def kv_lag(js, n: int = 20) -> dict:
    t = "bench-race"
    kv = await serving.serving_bucket(js)
    watcher = await kv.watch(t)
    seen: dict[int, datetime] = {}

    async def collect():
        async for entry in watcher:
            if entry is not None and entry.value:
                seen[json.loads(entry.value)["log_sequence"]] = entry.created

    task = asyncio.create_task(collect())
    actor = dict(actor="bench", reason="lag")
    seqs = []
    for i in range(n):
        got, s = await send(js, PromoteVersion(target=t, version="3" if i % 2 == 0 else "4", **actor))
        seqs.append(s.last_sequence)
    await wait(lambda: _async(all(q in seen for q in seqs)))
    task.cancel()
    await watcher.stop()
    lags = []
    for q in seqs:
        msg = await js.get_msg(subjects.STREAM, q, direct=True)
        lags.append((seen[q] - msg.time).total_seconds() * 1000)
    lags.sort()
    return {"promotions": n, "kv_lag_ms_median": statistics.median(lags), "kv_lag_ms_max": lags[-1]}


async def _async(value):
    return value


def main(rounds: int, versions: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    srv = start_nats(tmp / "nats")
    pg = start_postgres(tmp / "pg")  # runs its own event loop: before ours
    try:
        return asyncio.run(measure(srv, pg, tmp, rounds, versions))
    finally:
        srv.stop()
        stop_postgres(pg.pgdata)
        shutil.rmtree(tmp, ignore_errors=True)


async def measure(srv, pg, tmp: Path, rounds: int, versions: int) -> dict:
    services = []
    try:
        await migrate(pg.url)
        nc = await nats.connect(srv.url)
        js = nc.jetstream()
        await declare_streams(js)
        for name in ("a", "b"):  # two competing registry processes
            svc = build(RegistrySettings(nats_url=srv.url, data_dir=tmp / name, smoke=False, log_level="WARNING"))
            await svc.prepare_broker()
            await svc.broker.start()
            services.append(svc)
        audit = AuditService(AuditSettings(nats_url=srv.url, database_url=pg.url, data_dir=tmp / "audit",
                                           projector_poll_s=0.2, log_level="WARNING"))
        await audit.prepare_broker()
        await audit.broker.start()
        conn = await connect_as_app(pg.url)
        out = {"races": await races(js, rounds), "kv": await kv_lag(js), "long": await long_target(js, conn, versions)}
        await conn.close()
        await audit._shutdown()
        await audit.broker.stop()
        await nc.close()
        return out
    finally:
        for svc in services:
            await svc.broker.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--versions", type=int, default=1000)
    a = ap.parse_args()
    _ = app_dsn  # the recorder connects as tuneline_app (services.audit.db)
    res = main(a.rounds, a.versions)
    r, k, lg = res["races"], res["kv"], res["long"]
    rows = [
        ("racing rounds (3 commands, 2 registry processes)", r["rounds"], "rounds"),
        ("rounds with exactly one winner", r["winners_per_round"].get(1, 0), "rounds"),
        ("half-applied states in the log", r["half_applied"], "states"),
        ("median round (3 commands answered)", round(r["round_s_median"] * 1000, 1), "ms"),
        (f"serving --at on {lg['versions']} versions, median", round(lg["serving_at_ms_median"], 1), "ms"),
        (f"serving --at on {lg['versions']} versions, p95", round(lg["serving_at_ms_p95"], 1), "ms"),
        (f"history on {lg['versions']} versions, median", round(lg["history_ms_median"], 1), "ms"),
        (f"history on {lg['versions']} versions, p95", round(lg["history_ms_p95"], 1), "ms"),
        ("KV lag promoted -> serving bucket, median", round(k["kv_lag_ms_median"], 2), "ms"),
        ("KV lag promoted -> serving bucket, max", round(k["kv_lag_ms_max"], 2), "ms"),
    ]
    for name, value, unit in rows:
        print(f"{name:<52} {value:>10} {unit}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "registry.json").write_text(json.dumps(
        [{"name": name, "figure": value, "unit": unit} for name, value, unit in rows] + [{"raw": res}], indent=2,
        default=str))
