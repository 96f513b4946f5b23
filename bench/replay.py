"""Replay benchmark: how fast an operator's replays go over a store of N events (issue 16), each against a
plain PostgreSQL baseline over the same rows measured in the same run.

    python -m bench.replay [--events N ...] [--batch B]

For each N: a real nats-server and PostgreSQL are started; N events (whole runs, as bench/recorder.py makes
them, one in five failing at ingest) are published on the bus and recorded by the audit service (the recorder
and the projectors, the real path), then timed, one after the other:
- `replay projection timeline` and `replay projection history` (services/audit/replay.py: version N+1 built
  from run_events beside the live one, compared row by row, switched), against reading the same rows with a
  plain SELECT (what any projection must at least do);
- `replay store --into` (services/audit/replay_store.py: the stream recorded into a fresh database by the
  recorder's code, then compared position by position), against a plain COPY of run_events from the live
  database into a fresh one;
- `audit verify` (services/audit/chain.py), against the plain SELECT of the rows it reads.

Generation: one run's encoded envelopes are a template; each run copies it with fresh event ids and run id
(bytes replaced), so making a million events costs seconds; publishing goes through JetStream with
Nats-Msg-Id like any producer, to a nats-server that syncs on its default interval (BenchNats). Prints a
table (events/s, the baseline's events/s, their ratio) and writes bench/results/replay.json (with
--keep-other-sizes, the sizes it holds from an earlier run stay, each with its own baselines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats

from contracts import subjects
from contracts.registry import encode
from services.audit import chain, replay, replay_store
from services.audit.app import AuditService
from services.audit.migrate import migrate
from services.audit.settings import AuditSettings
from services.cli.stack import free_port, nats_server_binary, port_open, start_postgres, stop_pid, stop_postgres
from services.common.bus import declare_streams
from tests.factories import failed_run, successful_run

RESULTS = Path(__file__).resolve().parent / "results"
_TEMPLATE_RUN = "run-TEMPLATE0"


class BenchNats:
    """A nats-server for the set-up: the stack's configuration (JetStream, 8 MB payloads) without `sync_interval:
    always`, since publishing a million events one fsync each is set-up here, not what is measured (the
    replays only read the stream)."""

    def __init__(self, root: Path):
        import subprocess

        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = root / "bench-nats.conf"
        conf.write_text(f'listen: "127.0.0.1:{port}"\nmax_payload: 8MB\njetstream {{ store_dir: "{root / "js"}" }}\n')
        with open(root / "nats-server.log", "ab") as log:
            self.popen = subprocess.Popen([str(nats_server_binary()), "-c", str(conf)], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"nats://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port):
            if time.monotonic() > deadline or self.popen.poll() is not None:
                raise RuntimeError(f"nats-server did not start (see {root / 'nats-server.log'})")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_pid(self.popen.pid)


def _subject(env) -> str:
    kind = "command" if env.type == "run.start" else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


def _template(run: list) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    return [(_subject(e), encode(e)) for e in run], [str(e.event_id).encode() for e in run]


def generate(n: int):
    """Chunks of (subject, data, event id) for n events: runs copied from two templates with fresh ids."""
    ok = _template(successful_run(_TEMPLATE_RUN, progress_steps=5))
    bad = _template(failed_run(_TEMPLATE_RUN))
    made, i, chunk = 0, 0, []
    while made < n:
        msgs, ids = bad if i % 5 == 4 else ok
        fresh = [str(uuid.uuid4()).encode() for _ in ids]
        run = f"run-{i:09d}".encode()
        for k, (subject, data) in enumerate(msgs[:n - made]):
            for old, new in zip(ids, fresh):
                data = data.replace(old, new)
            chunk.append((subject, data.replace(_TEMPLATE_RUN.encode(), run), fresh[k].decode()))
            made += 1
        i += 1
        if len(chunk) >= 2000:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def publish_all(js, n: int) -> float:
    began = time.perf_counter()
    for chunk in generate(n):
        await asyncio.gather(*(js.publish(subject, data, headers={"Nats-Msg-Id": eid}, timeout=60)
                               for subject, data, eid in chunk))
    return time.perf_counter() - began


def _db(admin: str, name: str) -> str:
    return urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))


async def create_db(admin: str, name: str) -> str:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _db(admin, name)


async def record_live(nats_url: str, dsn: str, tmp: Path, n: int) -> float:
    """The audit service records and projects the stream: the live store the replays run over."""
    svc = AuditService(AuditSettings(nats_url=nats_url, database_url=dsn, data_dir=tmp / "data",
                                     projector_poll_s=0.05))
    began = time.perf_counter()
    await svc.prepare_broker()
    await svc.broker.start()
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            done = await conn.fetchval("SELECT count(*) = 2 FROM projection_checkpoints WHERE position >= $1", n)
            if done:
                break
            stopped = await conn.fetchval("SELECT error FROM projection_checkpoints WHERE error IS NOT NULL LIMIT 1")
            if stopped:
                raise RuntimeError(f"a projection stopped while recording: {stopped}")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
        await svc._shutdown()
        await svc.broker.stop()
    return time.perf_counter() - began


async def plain_select(dsn: str, columns: str, batch: int = 5000) -> float:
    """Every run_events row, by keyset pages in position order, with the columns the replay reads."""
    conn = await asyncpg.connect(dsn)
    try:
        began = time.perf_counter()
        position, rows = 0, 0
        while True:
            page = await conn.fetch(f"SELECT {columns} FROM run_events WHERE global_position > $1 "
                                    "ORDER BY global_position LIMIT $2", position, batch)
            if not page:
                break
            rows += len(page)
            position = page[-1]["global_position"]
        return time.perf_counter() - began
    finally:
        await conn.close()


async def plain_copy(live: str, admin: str) -> float:
    """COPY run_events out of the live database into a fresh, migrated one (the store copied, nothing checked)."""
    into = await create_db(admin, f"copy_{uuid.uuid4().hex[:8]}")
    await migrate(into)
    src, dst = await asyncpg.connect(live), await asyncpg.connect(into)
    try:
        began = time.perf_counter()
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)

        async def sink(data: bytes) -> None:
            await queue.put(data)

        async def source():
            while True:
                data = await queue.get()
                if data is None:
                    return
                yield data

        async def produce():
            await src.copy_from_query("SELECT * FROM run_events ORDER BY global_position", output=sink, format="binary")
            await queue.put(None)

        await asyncio.gather(produce(), dst.copy_to_table("run_events", source=source(), format="binary"))
        return time.perf_counter() - began
    finally:
        await src.close()
        await dst.close()


async def timed_projection(dsn: str, name: str) -> tuple[float, object]:
    began = time.perf_counter()
    report = await replay.rebuild_beside(dsn, name, actor="bench")
    seconds = time.perf_counter() - began
    if not report.identical:
        raise RuntimeError(f"{name}: the rebuilt version differs from the live one: {report.differences}")
    await replay.drop_version(dsn, name, report.live_version)  # keep the database to one copy
    return seconds, report


async def timed_verify(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        began = time.perf_counter()
        v = await chain.verify(conn)
        seconds = time.perf_counter() - began
    finally:
        await conn.close()
    if v.broken is not None:
        raise RuntimeError(f"the chain is broken at {v.broken}")
    return seconds


_PROJECTION_COLUMNS = ("global_position, event_id, type, run_id, correlation_id, occurred_at, severity, "
                       "reason_code, payload")
_CHAIN_COLUMNS = ("global_position, event_id, type, schema_version, run_id, correlation_id, causation_id, "
                  "occurred_at, producer, severity, reason_code, subject, payload::text AS payload, prev_hash, hash")


async def one_size(n: int, tmp: Path, pg, server) -> dict:
    live = await create_db(pg.url, "live")
    await migrate(live)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await declare_streams(js)
    publish_s = await publish_all(js, n)
    await nc.close()
    record_s = await record_live(server.url, live, tmp, n)
    rows = []

    def row(name, seconds, baseline_name, baseline_s, **extra):
        rows.append({"name": name, "events": n, "seconds": round(seconds, 3), "events_per_s": round(n / seconds),
                     "baseline": baseline_name, "baseline_seconds": round(baseline_s, 3),
                     "baseline_events_per_s": round(n / baseline_s), "ratio": round(baseline_s / seconds, 3),
                     **extra})

    select_s = await plain_select(live, _PROJECTION_COLUMNS)
    for name in ("timeline", "history"):
        seconds, report = await timed_projection(live, name)
        row(f"replay projection {name}", seconds, "SELECT the same rows", select_s,
            replayed=report.events, tables=list(report.differences))
    copy_s = await plain_copy(live, pg.url)
    into = _db(pg.url, f"into_{uuid.uuid4().hex[:8]}")
    began = time.perf_counter()
    store = await replay_store.replay_store(server.url, live, into)
    store_s = time.perf_counter() - began
    if not store.identical:
        raise RuntimeError(f"store replay differs: {store.diff.counts} {store.diff.samples}")
    row("replay store --into", store_s, "COPY run_events into a fresh db", copy_s,
        rebuild_s=round(store.rebuild_s, 3), compare_s=round(store.compare_s, 3))
    verify_s = await timed_verify(live)
    chain_select_s = await plain_select(live, _CHAIN_COLUMNS)
    row("audit verify", verify_s, "SELECT the same rows", chain_select_s)
    return {"events": n, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "publish_s": round(publish_s, 2), "record_and_project_s": round(record_s, 2),
            "rows": rows}


def print_table(results: list[dict]) -> None:
    print(f"{'replay':<24} {'events':>9} {'seconds':>9} {'events/s':>10}   {'baseline':<32} {'seconds':>8} "
          f"{'events/s':>10} {'ratio':>6}")
    for size in results:
        for r in size["rows"]:
            print(f"{r['name']:<24} {r['events']:>9,} {r['seconds']:>9.2f} {r['events_per_s']:>10,}   "
                  f"{r['baseline']:<32} {r['baseline_seconds']:>8.2f} {r['baseline_events_per_s']:>10,} "
                  f"{r['ratio']:>6.3f}")
        print(f"  set-up for {size['events']:,} events: published in {size['publish_s']}s, recorded and projected by "
              f"the audit service in {size['record_and_project_s']}s")
    print("ratio: the replay's events/s over the baseline's (1.0: as fast as the plain read or copy)")


def main(sizes: list[int]) -> list[dict]:
    out = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="tuneline-bench-replay-"))
        os.chmod(tmp, 0o755)
        pg = start_postgres(tmp / "pg")  # pgserver runs loops of its own: outside the benchmark's
        server = BenchNats(tmp / "nats")
        try:
            out.append(asyncio.run(one_size(n, tmp, pg, server)))
        finally:
            server.stop()
            stop_postgres(pg.pgdata)
            shutil.rmtree(tmp, ignore_errors=True)
        print_table(out[-1:])
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--keep-other-sizes", action="store_true",
                    help="keep the sizes bench/results/replay.json holds that this run does not measure")
    args = ap.parse_args()
    results = main(args.events)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "replay.json"
    sizes = {s["events"]: s for s in (json.loads(path.read_text())["sizes"] if args.keep_other_sizes and path.exists()
                                      else [])}
    sizes.update({s["events"]: s for s in results})
    path.write_text(json.dumps({
        "name": "replay timings", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "sizes": [sizes[n] for n in sorted(sizes)]}, indent=2) + "\n")
    print_table(results)
