"""API load benchmark (issue 15, D18): live streams and reads at once against a local stack.

    python -m bench.api [--clients 50] [--rate 200] [--seconds 30]

Its own nats-server and PostgreSQL, the audit service and the API as their own processes (as `tuneline up`
starts them), on loopback only. Seeded with recorded runs, then for `--seconds`:
- `--clients` Server-Sent Events clients on one run's stream, while a training.progress event is published for
  that run twice a second: each client must get every one (delivery latency = receipt - occurred_at);
- `--rate` reads per second (open loop: each request starts at its scheduled time whether or not the ones
  before it have answered, so a slow server shows as latency, not as a lower rate) spread over the read
  endpoints, one in ten `/api/health`.

Errors: a read that is not 200 or fails, a stream that is refused, breaks or misses a live event, and a bus
consumer left behind once the clients are gone. A live publish the bus does not acknowledge (a machine too
busy for nats-server) is counted on its own row: it is the bench's publisher failing, not the API. The baseline is `/api/health` (no token, no database) under
the same load in the same run: its p95 is what the server, the client and this machine cost before any read.

Prints a table and writes bench/results/api.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import nats

from contracts import subjects
from contracts.events import TrainingProgressed
from services.audit.migrate import migrate
from services.cli.stack import (free_port, http_ready, service_env, start_nats, start_postgres, start_service,
                                stop_pid, stop_postgres)
from services.common import tokens
from services.common.bus import PublishError, declare_streams, publish
from tests.factories import envelope, failed_run, successful_run

RESULTS = Path(__file__).resolve().parent / "results"
LIVE_RUN, SEED_RUN, TARGET = "run-live", "run-seed-0", "support-intents"
READS = ("/api/runs", f"/api/runs/{SEED_RUN}", f"/api/runs/{SEED_RUN}/events?limit=50", f"/api/runs/{SEED_RUN}/curve",
         f"/api/runs/{SEED_RUN}/evaluation", "/api/runs?status=failed", "/api/failures", "/api/targets",
         f"/api/targets/{TARGET}", f"/api/targets/{TARGET}/serving")
HEALTH = "/api/health"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) a process has used: this one, or another by its /proc entry."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subject_of(env) -> str:
    kind = "command" if env.type == "run.start" else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


async def seed(js, runs: int) -> tuple[int, list]:
    """Recorded runs to read, and the live run's first events (its stream needs the run recorded)."""
    last = 0
    for i in range(runs):
        for env in successful_run(f"run-seed-{i}") + failed_run(f"run-failed-{i}"):
            last = (await publish(js, env, subject_of(env))).seq
    live = successful_run(LIVE_RUN)[:4]  # run.start .. training.started: a run in training
    for env in live:
        last = (await publish(js, env, subject_of(env))).seq
    return last, live


class Streams:
    """The SSE clients' tallies."""

    def __init__(self) -> None:
        self.opened = 0
        self.errors: list[str] = []
        self.received: dict[int, set[int]] = {}  # client -> steps seen
        self.lag_ms: list[float] = []


async def sse_client(http: httpx.AsyncClient, n: int, headers: dict, tally: Streams, stop: asyncio.Event) -> None:
    tally.received[n] = set()
    try:
        async with http.stream("GET", f"/api/runs/{LIVE_RUN}/stream", headers=headers) as r:
            if r.status_code != 200:
                tally.errors.append(f"stream {n}: HTTP {r.status_code}")
                return
            tally.opened += 1
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                item = json.loads(line[6:])
                if item["type"] == "training.progress" and (item.get("progress") or {}).get("step", 0) >= 1000:
                    at = datetime.fromisoformat(item["occurred_at"])
                    tally.lag_ms.append((datetime.now(UTC) - at).total_seconds() * 1000)
                    tally.received[n].add(item["progress"]["step"])
    except (httpx.HTTPError, OSError) as exc:
        if not stop.is_set():
            tally.errors.append(f"stream {n}: {type(exc).__name__}")
    except asyncio.CancelledError:
        if not stop.is_set():
            tally.errors.append(f"stream {n}: ended early")
        raise


async def publish_live(js, live: list, stop: asyncio.Event, every_s: float = 0.5) -> tuple[list[int], int]:
    """training.progress for the live run every `every_s` until stopped; the steps whose publish the server
    acknowledged, and how many publishes were not acknowledged (the bus under load, not the API)."""
    steps, step, unacked = [], 1000, 0
    while not stop.is_set():
        env = envelope(TrainingProgressed(step=step, max_steps=10**6, epoch=1.0, loss=1.0, learning_rate=1e-3,
                                          examples_per_s=50.0, eta_s=3.0),
                       run_id=LIVE_RUN, causation=live[-1], producer="trainer")
        try:
            await publish(js, env, subject_of(env))
            steps.append(step)
        except PublishError:
            unacked += 1
        step += 1
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
    return steps, unacked


async def reads(http: httpx.AsyncClient, headers: dict, rate: float, seconds: float) -> dict[str, dict]:
    """Open-loop reads: request i starts at t0 + i / rate."""
    out: dict[str, dict] = {p: {"ms": [], "errors": []} for p in (*READS, HEALTH)}

    async def one(path: str) -> None:
        s0 = time.perf_counter()
        try:
            r = await http.get(path, headers=None if path == HEALTH else headers)
            if r.status_code != 200:
                out[path]["errors"].append(f"HTTP {r.status_code}")
                return
        except (httpx.HTTPError, OSError) as exc:
            out[path]["errors"].append(type(exc).__name__)
            return
        out[path]["ms"].append((time.perf_counter() - s0) * 1000)

    tasks, t0, total = [], time.perf_counter(), int(rate * seconds)
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        path = HEALTH if i % 10 == 0 else READS[(i - i // 10 - 1) % len(READS)]
        tasks.append(asyncio.create_task(one(path)))
    out["_launch_s"] = time.perf_counter() - t0  # type: ignore[assignment]
    await asyncio.gather(*tasks)
    return out


async def measure(nats_url: str, db_url: str, api: str, api_pid: int, clients: int, rate: float, seconds: float,
                  seed_runs: int) -> dict:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    last, live = await seed(js, seed_runs)
    import asyncpg

    conn = await asyncpg.connect(db_url)
    deadline = time.monotonic() + 120
    while not await conn.fetchval("SELECT coalesce(max(position), 0) >= $1 FROM projection_checkpoints "
                                  "WHERE projection = 'timeline'", last):
        if time.monotonic() > deadline:
            raise TimeoutError("the timeline projection did not catch up on the seeded runs")
        await asyncio.sleep(0.2)
    await conn.close()
    headers = {"Authorization": f"Bearer {await tokens.create(db_url, 'viewer', 'bench')}"}
    consumers_before = (await js.stream_info(subjects.STREAM)).state.consumer_count

    limits = httpx.Limits(max_connections=clients + 5, max_keepalive_connections=clients + 5)
    timeout = httpx.Timeout(10.0, read=None)  # a stream is idle between events; reads have their own below
    async with httpx.AsyncClient(base_url=api, limits=limits, timeout=timeout) as sse_http, \
            httpx.AsyncClient(base_url=api, timeout=10.0,
                              limits=httpx.Limits(max_connections=100, max_keepalive_connections=100)) as http:
        for path in (*READS, HEALTH):  # warm: every endpoint answers before the clock starts
            r = await http.get(path, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"{path} answered {r.status_code} before the load: {r.text[:200]}")
        stop, tally = asyncio.Event(), Streams()
        streams = [asyncio.create_task(sse_client(sse_http, n, headers, tally, stop)) for n in range(clients)]
        t_open = time.monotonic()
        while tally.opened + len(tally.errors) < clients and time.monotonic() - t_open < 30:
            await asyncio.sleep(0.05)
        open_s = time.monotonic() - t_open
        publisher = asyncio.create_task(publish_live(js, live, stop))
        cpu0, t0 = (cpu_s(), cpu_s(api_pid)), time.monotonic()
        read = await reads(http, headers, rate, seconds)
        load_s = time.monotonic() - t0
        cpu = {"load_s": load_s, "client_cpu_s": cpu_s() - cpu0[0], "api_cpu_s": cpu_s(api_pid) - cpu0[1],
               "loadavg_1m": os.getloadavg()[0]}
        stop.set()
        steps, unacked = await publisher
        await asyncio.sleep(2.0)  # the last event's way to every client
        for t in streams:
            t.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    # the API drops each client's consumer when its stream ends: none may be left behind
    deadline, left = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        left = (await js.stream_info(subjects.STREAM)).state.consumer_count - consumers_before
        if left <= 0:
            break
        await asyncio.sleep(0.5)
    await nc.close()
    missed = sum(len(set(steps) - got) for got in tally.received.values())
    return {"read": read, "streams": tally, "steps": steps, "missed": missed, "open_s": open_s,
            "consumers_left": max(left or 0, 0), "cpu": cpu,
            "unacked": unacked}


def main(clients: int, rate: float, seconds: float, seed_runs: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    srv = start_nats(tmp / "nats")
    pg = start_postgres(tmp / "pg")
    pids = []
    try:
        async def prepare():
            await migrate(pg.url)
            nc = await nats.connect(srv.url)
            await declare_streams(nc.jetstream())
            await nc.close()

        asyncio.run(prepare())
        port = free_port()
        env = service_env(tmp, srv.url, pg.url, cwd=tmp)
        env.update(TUNELINE_API_PORT=str(port), TUNELINE_API_HOST="127.0.0.1", TUNELINE_LOG_LEVEL="WARNING")
        for name in ("audit", "api"):
            pids.append(start_service(name, tmp, env))
        api = f"http://127.0.0.1:{port}"
        if not http_ready(api + HEALTH, timeout=60):
            raise RuntimeError(f"the API did not start: {(tmp / 'logs' / 'api.log').read_text()[-2000:]}")
        return asyncio.run(measure(srv.url, pg.url, api, pids[-1], clients, rate, seconds, seed_runs))
    finally:
        for pid in pids:
            stop_pid(pid)
        srv.stop()
        stop_postgres(pg.pgdata)
        shutil.rmtree(tmp, ignore_errors=True)


def report(res: dict, clients: int, rate: float, seconds: float) -> dict:
    read, tally, cpu = res["read"], res["streams"], res["cpu"]
    launch_s = read.pop("_launch_s")
    data_ms = [ms for p, r in read.items() if p != HEALTH for ms in r["ms"]]
    read_errors = sum(len(r["errors"]) for r in read.values())
    requests = sum(len(r["ms"]) + len(r["errors"]) for r in read.values())
    stream_errors = len(tally.errors) + res["missed"] + res["consumers_left"]
    health_p95 = pct(read[HEALTH]["ms"], 0.95)
    figure = pct(data_ms, 0.95)
    r1 = lambda x: None if x is None else round(x, 1)  # noqa: E731
    rows = [
        {"name": "reads sent (open loop)", "figure": requests, "unit": "requests"},
        {"name": "reads per second launched (on schedule when equal to the rate)",
         "figure": round(requests / launch_s, 1), "unit": "req/s"},
        {"name": "read errors", "figure": read_errors, "unit": "errors"},
        {"name": "reads (all endpoints but health), p50", "figure": r1(pct(data_ms, 0.5)), "unit": "ms"},
        {"name": "reads (all endpoints but health), p95", "figure": r1(figure), "unit": "ms"},
        {"name": "/api/health (baseline), p50", "figure": r1(pct(read[HEALTH]["ms"], 0.5)), "unit": "ms"},
        {"name": "/api/health (baseline), p95", "figure": r1(health_p95), "unit": "ms"},
    ]
    for path, r in read.items():
        if path != HEALTH:
            rows.append({"name": f"  {path}, p50 / p95 (n={len(r['ms'])}, errors {len(r['errors'])})",
                         "figure": f"{r1(pct(r['ms'], 0.5))} / {r1(pct(r['ms'], 0.95))}", "unit": "ms"})
    rows += [
        {"name": f"SSE clients open (of {clients}), time to open all",
         "figure": f"{tally.opened}, {res['open_s']:.1f} s", "unit": "clients"},
        {"name": "live events published (2/s) x clients", "figure": len(res["steps"]) * clients,
         "unit": "deliveries due"},
        {"name": "SSE deliveries missed", "figure": res["missed"], "unit": "deliveries"},
        {"name": "live publishes the bus did not acknowledge (bench's publisher, not the API)",
         "figure": res["unacked"], "unit": "publishes"},
        {"name": "SSE errors (refused, broken)", "figure": len(tally.errors), "unit": "errors"},
        {"name": "SSE delivery lag (occurred_at -> client), p50", "figure": r1(pct(tally.lag_ms, 0.5)), "unit": "ms"},
        {"name": "SSE delivery lag (occurred_at -> client), p95", "figure": r1(pct(tally.lag_ms, 0.95)), "unit": "ms"},
        {"name": "bus consumers left after the clients closed", "figure": res["consumers_left"], "unit": "consumers"},
        {"name": "errors in all (goal 0)", "figure": read_errors + stream_errors, "unit": "errors"},
        {"name": "API process CPU during the load (of 1 core)",
         "figure": round(100 * cpu["api_cpu_s"] / cpu["load_s"]), "unit": "%"},
        {"name": "load generator CPU during the load (of 1 core)",
         "figure": round(100 * cpu["client_cpu_s"] / cpu["load_s"]), "unit": "%"},
        {"name": f"machine load average (1 min) at the end, {os.cpu_count()} CPUs",
         "figure": round(cpu["loadavg_1m"], 2), "unit": "runnable"},
    ]
    return {"name": f"API reads p95 under {clients} SSE clients + {rate:g} reads/s for {seconds:g} s",
            "figure": r1(figure), "unit": "ms",
            "baseline": r1(health_p95), "baseline_is": "p95 of /api/health (no token, no database) in the same load",
            "ratio": round(figure / health_p95, 2) if figure and health_p95 else None, "rows": rows,
            "errors": {"reads": {p: r["errors"][:5] for p, r in read.items() if r["errors"]},
                       "streams": tally.errors[:10]},
            "machine": f"{os.cpu_count()} CPUs, shared; client, API, audit, nats-server and PostgreSQL on one host"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed-runs", type=int, default=20)
    a = ap.parse_args()
    out = report(main(a.clients, a.rate, a.seconds, a.seed_runs), a.clients, a.rate, a.seconds)
    print(f"{out['name']}: p95 {out['figure']} ms (baseline /api/health p95 {out['baseline']} ms, "
          f"ratio {out['ratio']})")
    for row in out["rows"]:
        print(f"{row['name']:<72} {row['figure']!s:>16} {row['unit']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "api.json").write_text(json.dumps(out, indent=2, default=str))
