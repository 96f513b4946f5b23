"""Recorder benchmark: events/s from the bus into run_events plus the timeline projection, against a
raw asyncpg COPY of the same rows into the same table, measured in the same run.

    python -m bench.recorder [--events N] [--rounds R] [--chain-rounds P]

Each round records the stream into a fresh database and COPYs the same rows into another; the best
round of each side is compared (as bench/ingest.py does), since one round of either varies by a
third or more from run to run on a shared 2-core machine.

The hash chain's cost (D19; goal: at most 10% of the recorder's throughput) in the same run: P pairs of
rounds, each recording the stream into fresh databases once with the chain and once without it (rows
without hashes), the order alternating from pair to pair, the recorder alone (no projector), timed to
the last row recorded. Each pair gives a ratio (throughput with the chain / without it) measured
seconds apart, so the load other processes put on a shared machine mostly hits both sides of it; the
figure is the median of the pairs' ratios, printed with their spread (min..max) and every pair's ratio.

Prints a table and writes bench/results/recorder.json and bench/results/recorder_chain.json as
{"name", "figure", "unit", "baseline", "ratio"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg
import nats

from bench.cpu import process_cpu_s, spent, tree_cpu_s
from contracts import subjects
from contracts.registry import encode
from services.audit.app import AuditService
from services.audit.db import app_dsn
from services.audit.migrate import migrate
from services.audit.recorder import CONSUMER
from services.audit.settings import AuditSettings
from services.cli.stack import postmaster_pid, start_nats, start_postgres, stop_postgres
from services.common.bus import declare_streams
from tests.factories import failed_run, successful_run

RESULTS = Path(__file__).resolve().parent / "results"


def make_events(n: int) -> list:
    """Whole runs (13 events each, one in five failing at ingest) until n events."""
    events, i = [], 0
    while len(events) < n:
        events += failed_run(f"run-{i}") if i % 5 == 4 else successful_run(f"run-{i}", progress_steps=5)
        i += 1
    return events[:n]


def subject_of(env) -> str:
    kind = "command" if env.type == "run.start" else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


async def publish_all(js, events) -> None:
    for i in range(0, len(events), 1000):
        chunk = events[i:i + 1000]
        await asyncio.gather(*(js.publish(subject_of(e), encode(e), headers={"Nats-Msg-Id": str(e.event_id)}, timeout=60)
                               for e in chunk))


async def fresh_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = admin_url.replace("/tuneline?", f"/{name}?")
    await migrate(dsn)
    return dsn


class CpuMeter:
    """CPU seconds over a stretch of the benchmark: this process (the audit service's loop runs in it),
    PostgreSQL (the postmaster's tree) and nats-server."""

    def __init__(self, pg_pid: int | None, nats_pid: int | None):
        self.pids = {"postgres": pg_pid, "nats": nats_pid}

    def read(self) -> dict[str, float | None]:
        return {"python": time.process_time(), "postgres": self.pids["postgres"] and tree_cpu_s(self.pids["postgres"]),
                "nats": self.pids["nats"] and process_cpu_s(self.pids["nats"])}



async def measure_recorder(nats_url: str, dsn: str, tmp: Path, n: int, meter: CpuMeter, *,
                           chained: bool = True, until_projected: bool = True) -> tuple[float, dict]:
    """Seconds (and CPU) until the stream is recorded, and projected unless `until_projected` is False
    (then the projector does not run: the recorder alone)."""
    settings = AuditSettings(nats_url=nats_url, database_url=dsn, data_dir=tmp / "data", projector_poll_s=0.05)
    svc = AuditService(settings)
    conn = await asyncpg.connect(dsn)
    await svc.connect()  # migration, pool, NATS: set-up, not throughput
    svc.recorder.chained = chained
    done = ("SELECT position FROM projection_checkpoints WHERE projection='timeline'" if until_projected
            else "SELECT max(global_position) FROM run_events")
    cpu_before = meter.read()
    start = time.perf_counter()
    svc.start_workers(projector=until_projected)
    try:
        while await conn.fetchval(done) != n:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        cpu = spent(cpu_before, meter.read())
    finally:
        await svc._shutdown()
        await svc.broker.stop()
    assert await conn.fetchval("SELECT count(*) FROM run_events") == n
    assert await conn.fetchval("SELECT count(*) FROM run_events WHERE hash IS NULL") == (0 if chained else n)
    if until_projected:
        assert await conn.fetchval("SELECT count(*) FROM timeline_entries") == n
    await conn.close()
    return elapsed, cpu


async def measure_copy(dsn: str, events, meter: CpuMeter) -> tuple[float, dict]:
    rows = [(i + 1, e.event_id, e.type, e.schema_version, e.run_id, e.correlation_id, e.causation_id, e.occurred_at,
             e.producer, e.severity.value, e.reason_code, subject_of(e), json.dumps(e.payload))
            for i, e in enumerate(events)]
    columns = ("global_position", "event_id", "type", "schema_version", "run_id", "correlation_id", "causation_id",
               "occurred_at", "producer", "severity", "reason_code", "subject", "payload")
    conn = await asyncpg.connect(app_dsn(dsn))  # as the recorder logs in
    cpu_before = meter.read()
    start = time.perf_counter()
    await conn.copy_records_to_table("run_events", records=rows, columns=columns)
    elapsed = time.perf_counter() - start
    cpu = spent(cpu_before, meter.read())
    await conn.close()
    return elapsed, cpu


async def measure(server, pg, tmp: Path, n: int, rounds: int,
                  chain_rounds: int) -> tuple[list, list, dict[bool, list]]:
    """Each round records the whole stream into a fresh database (a new durable consumer reads it
    from the start) and COPYs the same rows into another fresh database; rounds alternate the two.
    Then `chain_rounds` pairs: the recorder alone with the chain and without it, in alternating order."""
    events = make_events(n)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await declare_streams(js)
    await publish_all(js, events)
    meter = CpuMeter(postmaster_pid(pg.pgdata), server.pid)
    recorder_s, copy_s = [], []
    chain_s: dict[bool, list] = {True: [], False: []}

    async def fresh_consumer() -> None:
        try:
            await js.delete_consumer(subjects.STREAM, CONSUMER)
        except nats.js.errors.NotFoundError:
            pass

    for i in range(rounds):
        await fresh_consumer()
        recorder_s.append(await measure_recorder(server.url, await fresh_database(pg.url, f"bench_recorder_{i}"), tmp, n,
                                                 meter))
        copy_s.append(await measure_copy(await fresh_database(pg.url, f"bench_copy_{i}"), events, meter))
    for i in range(chain_rounds):
        for chained in ((True, False) if i % 2 == 0 else (False, True)):
            await fresh_consumer()
            dsn = await fresh_database(pg.url, f"bench_chain_{int(chained)}_{i}")
            chain_s[chained].append(await measure_recorder(server.url, dsn, tmp, n, meter, chained=chained,
                                                           until_projected=False))
    await nc.close()
    return recorder_s, copy_s, chain_s


def chain_summary(n: int, runs: dict[bool, list]) -> dict:
    """The chain's cost from paired rounds: per pair, throughput with the chain / without it (pair i is
    the i-th round of each side); the median of those ratios, their spread, and each side's median."""
    with_s, without_s = [s for s, _ in runs[True]], [s for s, _ in runs[False]]
    ratios = sorted(b / a for a, b in zip(with_s, without_s, strict=True))
    best_with = min(runs[True], key=lambda r: r[0])
    best_without = min(runs[False], key=lambda r: r[0])
    # CPU seconds (this process, PostgreSQL, nats-server) per pair, without / with: what the chain adds to the
    # work, which other processes' load changes much less than it changes wall time
    cpu = [(_cpu_total(a[1]), _cpu_total(b[1])) for a, b in zip(runs[True], runs[False], strict=True)]
    cpu_ratios = sorted(b / a for a, b in cpu if a and b)
    return {"name": "recorder_with_hash_chain_vs_without", "figure": round(n / statistics.median(with_s), 1),
            "unit": "events/s", "baseline": round(n / statistics.median(without_s), 1),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(ratios[0], 3), "ratio_max": round(ratios[-1], 3),
            "pair_ratios": [round(b / a, 3) for a, b in zip(with_s, without_s, strict=True)],
            "ratio_of_best_rounds": round(best_without[0] / best_with[0], 3),
            "cpu_ratio": round(statistics.median(cpu_ratios), 3) if cpu_ratios else None,
            "cpu_ratio_min": round(cpu_ratios[0], 3) if cpu_ratios else None,
            "cpu_ratio_max": round(cpu_ratios[-1], 3) if cpu_ratios else None,
            "with_chain_cpu_runs_s": [round(a, 3) if a else None for a, _ in cpu],
            "without_chain_cpu_runs_s": [round(b, 3) if b else None for _, b in cpu],
            "with_chain_runs_s": [round(x, 3) for x in with_s], "without_chain_runs_s": [round(x, 3) for x in without_s],
            "with_chain_cpu_s": best_with[1], "without_chain_cpu_s": best_without[1],
            "timing": "median over pairs of rounds (chain on and off back to back, order alternating), "
                      "the recorder alone, until the last row is recorded"}


def _cpu_total(cpu: dict) -> float | None:
    known = [v for v in cpu.values() if v is not None]
    return sum(known) if len(known) == len(cpu) else None


def main(n: int, rounds: int = 3, chain_rounds: int = 6) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="tuneline-bench-"))
    server = start_nats(tmp / "nats")
    pg = start_postgres(tmp / "pg")
    try:
        recorder_runs, copy_runs, chain_runs = asyncio.run(measure(server, pg, tmp, n, rounds, chain_rounds))
    finally:
        server.stop()
        stop_postgres(pg.pgdata)
        shutil.rmtree(tmp, ignore_errors=True)
    (recorder_s, recorder_cpu), (copy_s, copy_cpu) = (min(runs, key=lambda r: r[0]) for runs in (recorder_runs, copy_runs))
    figure, baseline = n / recorder_s, n / copy_s
    return {"chain": chain_summary(n, chain_runs), "chain_rounds": chain_rounds, "name": "recorder_bus_to_run_events_plus_timeline", "figure": round(figure, 1), "unit": "events/s",
            "baseline": round(baseline, 1), "ratio": round(figure / baseline, 3),
            "events": n, "recorder_s": round(recorder_s, 3), "copy_s": round(copy_s, 3),
            "rounds": rounds, "recorder_runs_s": [round(x, 3) for x, _ in recorder_runs],
            "copy_runs_s": [round(x, 3) for x, _ in copy_runs], "timing": "best of rounds, both sides",
            "recorder_cpu_s": recorder_cpu, "copy_cpu_s": copy_cpu, "cpus": os.cpu_count(),
            "baseline_name": "asyncpg COPY of the same rows into run_events",
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip()}


def print_chain(chain: dict, events: int, pairs: int) -> None:
    print(f"{chain['name']:<44} {chain['figure']:>12,.0f} {chain['baseline']:>12,.0f} {chain['unit']:<9} "
          f"{chain['ratio']:>6.2f}  >= 0.90 {'ok' if chain['ratio'] >= 0.9 else 'MISSED'}")
    print(f"  {events} events, {pairs} pairs of rounds (the recorder alone, to the last row recorded): median ratio "
          f"{chain['ratio']:.3f}, spread {chain['ratio_min']:.3f}..{chain['ratio_max']:.3f}, per pair "
          f"{chain['pair_ratios']}; best round against best round {chain['ratio_of_best_rounds']:.3f}")
    print(f"  with the chain {chain['with_chain_runs_s']}s, without {chain['without_chain_runs_s']}s; the chain costs "
          f"{(1 - chain['ratio']) * 100:.1f}% of the recorder's throughput (median)")
    if chain["cpu_ratio"] is not None:
        print(f"  CPU seconds (python + postgres + nats) without / with, median over pairs {chain['cpu_ratio']:.3f}, spread "
              f"{chain['cpu_ratio_min']:.3f}..{chain['cpu_ratio_max']:.3f}: with {chain['with_chain_cpu_runs_s']}, "
              f"without {chain['without_chain_cpu_runs_s']}")
    for side in ("with_chain", "without_chain"):
        cpu = chain[f"{side}_cpu_s"]
        print(f"  CPU seconds in the best round {side.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))


def print_table(result: dict) -> None:
    print(f"{'benchmark':<44} {'figure':>12} {'baseline':>12} {'unit':<9} {'ratio':>6}  target")
    print(f"{result['name']:<44} {result['figure']:>12,.0f} {result['baseline']:>12,.0f} {result['unit']:<9} "
          f"{result['ratio']:>6.2f}  >= 0.50 {'ok' if result['ratio'] >= 0.5 else 'MISSED'}")
    print(f"  {result['events']} events, best of {result['rounds']} rounds: recorder + projection {result['recorder_s']}s "
          f"{result['recorder_runs_s']}, baseline ({result['baseline_name']}) {result['copy_s']}s {result['copy_runs_s']}")
    for side in ("recorder", "copy"):
        cpu = result[f"{side}_cpu_s"]
        known = [v for v in cpu.values() if v is not None]
        print(f"  CPU seconds in the best {side} round: " + ", ".join(f"{k} {v}" for k, v in cpu.items())
              + (f"; {sum(known):.3f} in all, so at least {sum(known) / result['cpus']:.3f}s of wall time on "
                 f"{result['cpus']} cpus" if known else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chain-rounds", type=int, default=6, help="pairs of rounds (chain on, chain off)")
    args = ap.parse_args()
    result = main(args.events, args.rounds, args.chain_rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recorder.json").write_text(json.dumps(
        {k: result[k] for k in ("name", "figure", "unit", "baseline", "ratio")}, indent=2) + "\n")
    (RESULTS / "recorder_chain.json").write_text(json.dumps(
        {k: result["chain"][k] for k in ("name", "figure", "unit", "baseline", "ratio", "ratio_min", "ratio_max",
                                         "pair_ratios", "cpu_ratio")}, indent=2) + "\n")
    print_table(result)
    print_chain(result["chain"], result["events"], result["chain_rounds"])
