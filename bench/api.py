"""API load benchmark (issue 15, D18): live streams and reads at once against a local stack.

    python -m bench.api [--clients 50] [--rate 200] [--seconds 30] [--workers 2]
    python -m bench.api --profile [--cprofile]     # where one read's time goes (API CPU per request)

Its own nats-server and PostgreSQL, the audit service and the API as their own processes (as `tuneline up`
starts them), on loopback only, seeded with recorded runs. Three processes load it:
- this one: `--clients` Server-Sent Events clients on one run's stream, while a training.progress event is
  published for that run twice a second: each client must get every one (delivery lag = receipt - occurred_at);
- a reads generator (its own process, so that the clients' work does not delay its schedule): open loop,
  request i is sent at t0 + i / rate whether or not earlier ones have answered, and its latency is measured
  from that scheduled time (a server or client that falls behind shows as latency, never as a lower rate).
  First a baseline phase of `/api/health` (no token, no database) at the same rate, then `--seconds` of
  reads spread over the read endpoints.

Errors: a read that is not 200 or fails, a stream that is refused, breaks or misses a live event, and a bus
consumer left behind once the clients are gone. A live publish the bus does not acknowledge (a machine too
busy for nats-server) is counted on its own row: it is the bench's publisher failing, not the API.

The profile mode sends each read endpoint sequentially (closed loop) and divides the API processes' CPU time
by the requests: the cost of one request on the server, which bounds the rate one core can serve.

Prints a table and writes bench/results/api.json (api_profile.json for --profile).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LIVE_RUN, SEED_RUN, TARGET = "run-live", "run-seed-0", "support-intents"
READS = ("/api/runs", f"/api/runs/{SEED_RUN}", f"/api/runs/{SEED_RUN}/events?limit=50", f"/api/runs/{SEED_RUN}/curve",
         f"/api/runs/{SEED_RUN}/evaluation", "/api/runs?status=failed", "/api/failures", "/api/targets",
         f"/api/targets/{TARGET}", f"/api/targets/{TARGET}/serving", f"/api/targets/{TARGET}/versions/1")
HEALTH = "/api/health"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (uvicorn's workers)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += _cpu_of(p)
        todo += kids.get(p, [])
    return total


# --- the stack ----------------------------------------------------------------------------------------


@dataclass
class Stack:
    nats_url: str
    db_url: str
    api: str
    api_pid: int
    token: str
    live: list


def subject_of(env) -> str:
    from contracts import subjects

    kind = "command" if env.type == "run.start" else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


async def _seed(nats_url: str, db_url: str, runs: int) -> tuple[list, str]:
    """Recorded runs to read (each registered: the target's History has versions), the live run's first
    events (its stream needs the run recorded), once both projections have read them; and a viewer token."""
    import asyncpg
    import nats

    from services.common import tokens
    from services.common.bus import publish
    from tests.factories import failed_run, successful_run

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    last = 0
    for i in range(runs):
        envs = successful_run(f"run-seed-{i}")
        reg = envs[-1]
        envs[-1] = reg.model_copy(update={"payload": {**reg.payload, "version": i + 1}})
        for env in envs + failed_run(f"run-failed-{i}"):
            last = (await publish(js, env, subject_of(env))).seq
    live = successful_run(LIVE_RUN)[:4]  # run.start .. training.started: a run in training
    for env in live:
        last = (await publish(js, env, subject_of(env))).seq
    await nc.close()
    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + 180
        while await conn.fetchval("SELECT count(*) FROM projection_checkpoints WHERE position >= $1 "
                                  "AND projection IN ('timeline', 'history')", last) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the projections did not catch up on the seeded runs")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return live, await tokens.create(db_url, "viewer", "bench")


@contextmanager
def local_stack(seed_runs: int, workers: int, cprofile: Path | None = None):
    import nats

    from services.audit.migrate import migrate
    from services.cli.stack import (REPO_ROOT, free_port, http_ready, service_env, start_nats, start_postgres,
                                    start_service, stop_pid, stop_postgres)
    from services.common.bus import declare_streams

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
        env.update(TUNELINE_API_PORT=str(port), TUNELINE_API_HOST="127.0.0.1", TUNELINE_LOG_LEVEL="WARNING",
                   TUNELINE_API_WORKERS=str(workers))
        pids.append(start_service("audit", tmp, env))
        if cprofile is None:
            pids.append(start_service("api", tmp, env))
        else:  # the API under cProfile (one worker), its stats written when it stops
            import subprocess
            import sys

            with open(tmp / "api.log", "ab") as out:
                # uvicorn raises the SIGTERM again once it has shut down: this handler makes that an exit that
                # lets the profile be written
                code = ("import cProfile, signal, sys\nfrom services.api.app import main\n"
                        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\np = cProfile.Profile()\np.enable()\n"
                        f"try:\n    main()\nfinally:\n    p.disable()\n    p.dump_stats({str(cprofile)!r})\n")
                pids.append(subprocess.Popen([sys.executable, "-c", code],
                                             env={**env, "TUNELINE_API_WORKERS": "1"}, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             cwd=str(REPO_ROOT)).pid)
        api = f"http://127.0.0.1:{port}"
        if not http_ready(api + HEALTH, timeout=60):
            logs = "\n".join(p.read_text()[-2000:] for p in tmp.rglob("*.log"))
            raise RuntimeError(f"the API did not start: {logs}")
        live, token = asyncio.run(_seed(srv.url, pg.url, seed_runs))
        yield Stack(srv.url, pg.url, api, pids[-1], token, live)
    finally:
        for pid in reversed(pids):
            stop_pid(pid)
        srv.stop()
        stop_postgres(pg.pgdata)
        shutil.rmtree(tmp, ignore_errors=True)


# --- the reads generator (its own process) ----------------------------------------------------------


async def _open_loop(api: str, token: str, phases: list[tuple[str, list[str], float, float]]) -> dict:
    """Each phase: (name, paths round-robin, rate, seconds). Latency from each request's scheduled time."""
    import aiohttp

    out: dict[str, dict] = {}
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(base_url=api, connector=aiohttp.TCPConnector(limit=400),
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        for path in {p for _, paths, _, _ in phases for p in paths}:  # warm: every endpoint answers first
            async with http.get(path, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{path} answered {r.status} before the load: {(await r.text())[:300]}")
        for name, paths, rate, seconds in phases:
            per: dict[str, dict] = {p: {"ms": [], "errors": []} for p in paths}
            late: list[float] = []

            async def one(path: str, at: float) -> None:
                late.append((time.perf_counter() - at) * 1000)
                try:
                    async with http.get(path, headers=headers) as r:
                        await r.read()
                        if r.status != 200:
                            per[path]["errors"].append(f"HTTP {r.status}")
                            return
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    per[path]["errors"].append(type(exc).__name__)
                    return
                per[path]["ms"].append((time.perf_counter() - at) * 1000)

            tasks, total = [], int(rate * seconds)
            t0 = time.perf_counter() + 0.1
            for i in range(total):
                at = t0 + i / rate
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(paths[i % len(paths)], at)))
            sent_s = time.perf_counter() - t0
            await asyncio.gather(*tasks)
            done_s = time.perf_counter() - t0
            out[name] = {"paths": per, "rate": rate, "seconds": seconds, "sent": total, "sent_s": sent_s,
                         "done_s": done_s, "send_late_ms_p95": pct(late, 0.95)}
    return out


def _reads_process(api: str, token: str, phases: list, conn) -> None:
    try:
        conn.send(asyncio.run(_open_loop(api, token, phases)))
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


# --- SSE clients and the live publisher (this process) ----------------------------------------------


class Streams:
    def __init__(self) -> None:
        self.opened = 0
        self.errors: list[str] = []
        self.received: dict[int, set[int]] = {}  # client -> steps seen
        self.lag_ms: list[float] = []


async def sse_client(http, n: int, headers: dict, tally: Streams, stop: asyncio.Event) -> None:
    import aiohttp

    tally.received[n] = set()
    try:
        async with http.get(f"/api/runs/{LIVE_RUN}/stream", headers=headers) as r:
            if r.status != 200:
                tally.errors.append(f"stream {n}: HTTP {r.status}")
                return
            tally.opened += 1
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if not line.startswith("data: "):
                    continue
                item = json.loads(line[6:])
                if item["type"] == "training.progress" and (item.get("progress") or {}).get("step", 0) >= 1000:
                    at = datetime.fromisoformat(item["occurred_at"])
                    tally.lag_ms.append((datetime.now(UTC) - at).total_seconds() * 1000)
                    tally.received[n].add(item["progress"]["step"])
    except (aiohttp.ClientError, OSError) as exc:
        if not stop.is_set():
            tally.errors.append(f"stream {n}: {type(exc).__name__}")
    except asyncio.CancelledError:
        if not stop.is_set():
            tally.errors.append(f"stream {n}: ended early")
        raise


async def publish_live(js, live: list, stop: asyncio.Event, every_s: float = 0.5) -> tuple[list[int], int]:
    from contracts.events import TrainingProgressed
    from services.common.bus import PublishError, publish
    from tests.factories import envelope

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


async def measure(stack: Stack, clients: int, rate: float, seconds: float, baseline_s: float) -> dict:
    import aiohttp
    import nats

    from contracts import subjects

    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    headers = {"Authorization": f"Bearer {stack.token}"}
    consumers_before = (await js.stream_info(subjects.STREAM)).state.consumer_count
    async with aiohttp.ClientSession(base_url=stack.api, connector=aiohttp.TCPConnector(limit=clients + 5),
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as sse_http:
        stop, tally = asyncio.Event(), Streams()
        streams = [asyncio.create_task(sse_client(sse_http, n, headers, tally, stop)) for n in range(clients)]
        t_open = time.monotonic()
        while tally.opened + len(tally.errors) < clients and time.monotonic() - t_open < 30:
            await asyncio.sleep(0.05)
        open_s = time.monotonic() - t_open
        publisher = asyncio.create_task(publish_live(js, stack.live, stop))
        phases = [("baseline", [HEALTH], rate, baseline_s), ("reads", list(READS), rate, seconds)]
        parent, child = multiprocessing.get_context("spawn").Pipe(duplex=False)
        proc = multiprocessing.get_context("spawn").Process(target=_reads_process,
                                                            args=(stack.api, stack.token, phases, child))
        cpu0, t0 = (tree_cpu_s(stack.api_pid), time.monotonic()), time.monotonic()
        proc.start()
        child.close()
        read = await asyncio.to_thread(parent.recv)
        await asyncio.to_thread(proc.join)
        load_s = time.monotonic() - t0
        cpu = {"load_s": load_s, "api_cpu_s": tree_cpu_s(stack.api_pid) - cpu0[0], "loadavg_1m": os.getloadavg()[0]}
        stop.set()
        steps, unacked = await publisher
        await asyncio.sleep(2.0)  # the last event's way to every client
        for t in streams:
            t.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    if "error" in read:
        raise RuntimeError(f"the reads generator failed: {read['error']}")
    deadline, left = time.monotonic() + 20, None
    while time.monotonic() < deadline:  # the API drops each client's consumer when its stream ends
        left = (await js.stream_info(subjects.STREAM)).state.consumer_count - consumers_before
        if left <= 0:
            break
        await asyncio.sleep(0.5)
    await nc.close()
    missed = sum(len(set(steps) - got) for got in tally.received.values())
    return {"read": read, "streams": tally, "steps": steps, "missed": missed, "open_s": open_s,
            "consumers_left": max(left or 0, 0), "cpu": cpu, "unacked": unacked}


def r1(x):
    return None if x is None else round(x, 1)


def report(res: dict, clients: int, rate: float, seconds: float, workers: int) -> dict:
    read, tally, cpu = res["read"], res["streams"], res["cpu"]
    rows, phase_out = [], {}
    for name in ("baseline", "reads"):
        ph = read[name]
        ms = [m for r in ph["paths"].values() for m in r["ms"]]
        errors = sum(len(r["errors"]) for r in ph["paths"].values())
        achieved = len(ms) / ph["done_s"] if ph["done_s"] else None
        phase_out[name] = {"p50": pct(ms, 0.5), "p95": pct(ms, 0.95), "p99": pct(ms, 0.99), "errors": errors,
                           "achieved": achieved}
        label = "/api/health (baseline)" if name == "baseline" else "reads (every read endpoint)"
        rows += [
            {"name": f"{label}: sent at {ph['rate']:g}/s for {ph['seconds']:g} s, answered 200",
             "figure": f"{len(ms)} of {ph['sent']}", "unit": "requests"},
            {"name": f"{label}: achieved rate (answers / time to the last answer)", "figure": r1(achieved),
             "unit": "req/s"},
            {"name": f"{label}: errors", "figure": errors, "unit": "errors"},
            {"name": f"{label}: p50 / p95 / p99 from the scheduled time",
             "figure": f"{r1(pct(ms, 0.5))} / {r1(pct(ms, 0.95))} / {r1(pct(ms, 0.99))}", "unit": "ms"},
            {"name": f"{label}: generator's send lateness p95 (its own schedule)",
             "figure": r1(ph["send_late_ms_p95"]), "unit": "ms"},
        ]
    for path, r in read["reads"]["paths"].items():
        rows.append({"name": f"  {path}, p50 / p95 (n={len(r['ms'])}, errors {len(r['errors'])})",
                     "figure": f"{r1(pct(r['ms'], 0.5))} / {r1(pct(r['ms'], 0.95))}", "unit": "ms"})
    stream_errors = len(tally.errors) + res["missed"] + res["consumers_left"]
    rows += [
        {"name": f"SSE clients open (of {clients}), time to open all",
         "figure": f"{tally.opened}, {res['open_s']:.1f} s", "unit": "clients"},
        {"name": "live events published (2/s) x clients", "figure": len(res["steps"]) * clients,
         "unit": "deliveries due"},
        {"name": "SSE deliveries missed", "figure": res["missed"], "unit": "deliveries"},
        {"name": "live publishes the bus did not acknowledge (bench's publisher, not the API)",
         "figure": res["unacked"], "unit": "publishes"},
        {"name": "SSE errors (refused, broken)", "figure": len(tally.errors), "unit": "errors"},
        {"name": "SSE delivery lag (occurred_at -> client), p50 / p95",
         "figure": f"{r1(pct(tally.lag_ms, 0.5))} / {r1(pct(tally.lag_ms, 0.95))}", "unit": "ms"},
        {"name": "bus consumers left after the clients closed", "figure": res["consumers_left"], "unit": "consumers"},
        {"name": "errors in all (goal 0)", "figure": phase_out["reads"]["errors"] + phase_out["baseline"]["errors"]
         + stream_errors, "unit": "errors"},
        {"name": f"API processes' CPU during both phases ({workers} worker(s), % of one core)",
         "figure": round(100 * cpu["api_cpu_s"] / cpu["load_s"]), "unit": "%"},
        {"name": f"machine load average (1 min) at the end, {os.cpu_count()} CPUs",
         "figure": round(cpu["loadavg_1m"], 2), "unit": "runnable"},
    ]
    reads_p95, base_p95 = phase_out["reads"]["p95"], phase_out["baseline"]["p95"]
    return {"name": f"API reads p95 under {clients} SSE clients + {rate:g} reads/s for {seconds:g} s",
            "figure": r1(reads_p95), "unit": "ms", "baseline": r1(base_p95),
            "baseline_is": "p95 of /api/health (no token, no database) at the same rate, same SSE clients, same run",
            "ratio": round(reads_p95 / base_p95, 2) if reads_p95 and base_p95 else None,
            "phases": {k: {kk: r1(vv) if isinstance(vv, float) else vv for kk, vv in v.items()}
                       for k, v in phase_out.items()},
            "workers": workers, "rows": rows,
            "errors": {"reads": {p: r["errors"][:5] for ph in read.values() for p, r in ph["paths"].items()
                                 if r["errors"]}, "streams": tally.errors[:10]},
            "machine": f"{os.cpu_count()} CPUs, shared with other work; generator, SSE clients, API, audit, "
                       "nats-server and PostgreSQL on one host"}


# --- profile: one request's cost on the server ---------------------------------------------------------


async def _profile(stack: Stack, requests: int) -> list[dict]:
    import aiohttp

    headers = {"Authorization": f"Bearer {stack.token}"}
    out = []
    async with aiohttp.ClientSession(base_url=stack.api) as http:
        for path in (HEALTH, *READS):
            for _ in range(10):
                async with http.get(path, headers=headers) as r:
                    body = await r.read()
            cpu0, wall = tree_cpu_s(stack.api_pid), []
            for _ in range(requests):
                s0 = time.perf_counter()
                async with http.get(path, headers=headers) as r:
                    await r.read()
                wall.append((time.perf_counter() - s0) * 1000)
            cpu_ms = (tree_cpu_s(stack.api_pid) - cpu0) * 1000 / requests
            out.append({"path": path, "api_cpu_ms": round(cpu_ms, 2), "wall_p50_ms": r1(pct(wall, 0.5)),
                        "bytes": len(body), "per_core_rps": round(1000 / cpu_ms) if cpu_ms else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--baseline-seconds", type=float, default=10.0)
    ap.add_argument("--seed-runs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=int(os.environ.get("TUNELINE_API_WORKERS", "2")))
    ap.add_argument("--profile", action="store_true", help="API CPU per request, endpoint by endpoint")
    ap.add_argument("--requests", type=int, default=200, help="--profile: requests per endpoint")
    ap.add_argument("--cprofile", action="store_true", help="--profile with the API under cProfile: its top functions")
    a = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if a.profile:
        prof = Path(tempfile.mkdtemp(prefix="bench-api-prof-")) / "api.prof" if a.cprofile else None
        workers = 1 if a.cprofile else a.workers
        with local_stack(a.seed_runs, workers, prof) as stack:
            rows = asyncio.run(_profile(stack, a.requests))
        print(f"API CPU per request, {a.requests} sequential requests per endpoint ({workers} worker(s); the generator shares this machine's {os.cpu_count()} CPUs)")
        print(f"{'endpoint':<44}{'API CPU ms/req':>15}{'wall p50 ms':>13}{'bytes':>9}{'req/s per core':>16}")
        for r in rows:
            print(f"{r['path']:<44}{r['api_cpu_ms']:>15}{r['wall_p50_ms']:>13}{r['bytes']:>9}{r['per_core_rps']!s:>16}")
        (RESULTS / "api_profile.json").write_text(json.dumps({"workers": workers, "requests": a.requests,
                                                              "rows": rows}, indent=2))
        if prof is not None:
            import pstats

            if not prof.exists():
                raise SystemExit("the API wrote no profile (did it stop cleanly?)")
            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(45)
        return
    with local_stack(a.seed_runs, a.workers) as stack:
        res = asyncio.run(measure(stack, a.clients, a.rate, a.seconds, a.baseline_seconds))
    out = report(res, a.clients, a.rate, a.seconds, a.workers)
    print(f"{out['name']}: p95 {out['figure']} ms (baseline /api/health p95 {out['baseline']} ms at the same rate, "
          f"ratio {out['ratio']}); {a.workers} API worker(s); the generator shares this machine's {os.cpu_count()} CPUs")
    for row in out["rows"]:
        print(f"{row['name']:<78} {row['figure']!s:>22} {row['unit']}")
    (RESULTS / "api.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
