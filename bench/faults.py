"""The fault suite (issue 16, `make faults`): a real stack (`tuneline up` in a fresh data directory), at least 20
small runs of the demo pipeline, and faults injected at random points while they run:

  kill -9 of every service (each stage, audit, api); nats-server killed -9 and restarted; PostgreSQL stopped
  for 30 s; the artifact directory made read-only for 10 s (`chattr +i`: the services run as root here, and
  root ignores mode bits); poison messages published on the stages' subjects (not JSON, an unknown type, an
  invalid payload, a 2 MB payload); three concurrent promotions of one target.

Nothing restarts a dead service by itself (services/cli/stack.py has no supervisor; `tuneline up` repairs:
it restarts the dead services, and every service when it had to restart nats-server or PostgreSQL). So after
each fault the suite does what an operator does: it runs `tuneline up`, and records when.

Figures, each with its goal (the suite exits 1 when one misses):
  runs terminal          runs that reached succeeded/failed                               100%
  events lost            stream positions neither in run_events nor accounted as skipped   0
  duplicated effects     two versions registered (or hosted jobs) for one run, or a promotion
                         that demoted a version which was no longer production              0
  training restarts      a trainer kill mid-training leaves a training.restarted, resuming
                         from the last checkpoint reported before the kill                 every one
  steps repeated         steps trained again after a kill (reported step - resumed step)   (reported)
  projections            timeline: `tuneline replay projection timeline` identical;
                         history: rows before == rows after `tuneline rebuild history`      identical
  chain                  `tuneline audit verify`                                           intact
  poison                 each poison message dead-lettered / accounted, no service died     all
  recovery               kill -> the stage's next event, per service; the goal is the
                         stage resuming within 10 s of the restart (`tuneline up` done)     <= 10 s

    nice -n 5 .venv/bin/python -m bench.faults [--runs 20] [--seed N] [--data-dir DIR] [--keep]

The machine this runs on may be shared: the figures that are times say so in the results file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts import subjects  # noqa: E402
from services.cli import stack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "faults.json"
TARGET = "faults"
STAGES = ("ingest", "prep", "trainer", "evaluator", "export", "registry")
DURABLES = {"ingest": "ingest-run-start", "prep": "prep-ingest-committed", "trainer": "trainer-prep-prepared",
            "evaluator": "evaluator-training-completed", "export": "export-eval-completed",
            "registry": "registry-export-completed", "audit": "audit-recorder"}
RECOVERY_GOAL_S = 10.0
POISON_KINDS = ("non_json", "unknown_type", "invalid_payload", "payload_2mb")
# (subject, the stage consuming it) each poison kind is published on
POISON_SUBJECTS = {"non_json": ("tuneline.evt.prep.prepared", "trainer"),
                   "unknown_type": ("tuneline.evt.training.completed", "evaluator"),
                   "invalid_payload": ("tuneline.evt.eval.completed", "export"),
                   "payload_2mb": ("tuneline.evt.export.completed", "registry")}
REGISTERED = ("registry.version_registered", "registry.hosted_version_registered")


def now() -> float:
    return time.time()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def log(msg: str) -> None:
    print(f"[faults {datetime.now(timezone.utc):%H:%M:%S}] {msg}", flush=True)



def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


async def busiest(pids: list[int], window_s: float = 0.5) -> int:
    """The pid that used the most CPU over `window_s` (the first one when none did)."""
    before = {p: _cpu_ticks(p) for p in pids}
    await asyncio.sleep(window_s)
    return max(pids, key=lambda p: (_cpu_ticks(p) - before[p], -pids.index(p)))

class Suite:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="tuneline-faults-")).resolve()
        self.env = dict(os.environ, TUNELINE_DATA_DIR=str(self.data_dir), TUNELINE_API_PORT=str(stack.free_port()),
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.env.pop("NATS_URL", None)
        self.env.pop("DATABASE_URL", None)
        self.runs: dict[str, dict] = {}
        self.faults: list[dict] = []
        self.ups: list[dict] = []
        self.unexpected_deaths: list[dict] = []
        self.killed_by_us: set[int] = set()
        self.nc = self.js = None
        self.replicas = ""

    # --- the CLI, as an operator runs it -------------------------------------------------------------

    async def cli(self, *args: str, timeout: float = 900) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", *args, cwd=str(ROOT), env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return 124, "", f"timed out after {timeout}s"
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def up(self, why: str) -> dict:
        began = now()
        args = ["up"] + (["--replicas", self.replicas] if self.replicas else [])
        rc, out, err = await self.cli(*args)
        done = now()
        entry = {"why": why, "at": iso(began), "wall_s": round(done - began, 2), "rc": rc, "done": done}
        if rc != 0:
            entry["output"] = (out + err)[-1500:]
            log(f"tuneline up ({why}) exited {rc}: {(out + err)[-400:]}")
        self.ups.append(entry)
        return entry

    def state(self) -> dict:
        return stack.read_state(self.data_dir) or {}

    def db_url(self) -> str:
        return self.state()["postgres"]["url"]

    async def query(self, sql: str, *params, retries: int = 3):
        import asyncpg

        for attempt in range(retries):
            try:
                conn = await asyncpg.connect(self.db_url(), timeout=5)
                try:
                    return await conn.fetch(sql, *params)
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError, asyncio.TimeoutError, KeyError):
                if attempt == retries - 1:
                    return None
                await asyncio.sleep(1)

    async def connect_nats(self) -> None:
        import nats

        async def quiet(_exc):
            pass

        # the stack's nats-server has a user per service (services/common/nats_auth.py): inject as admin
        url = self.state()["nats"]["url"]
        if hasattr(stack, "client_nats_url"):  # a stack without NATS users (an older tree): the URL as it is
            url = stack.client_nats_url(self.data_dir, url, self.state(), "admin")
        self.nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=quiet)
        self.js = self.nc.jetstream()

    async def delivered(self, service: str) -> int | None:
        """The durable's count of deliveries so far (each redelivery counts): it grows when a worker takes a message."""
        try:
            info = await asyncio.wait_for(self.js.consumer_info(subjects.STREAM, DURABLES[service]), 2)
            return info.delivered.consumer_seq
        except Exception:  # noqa: BLE001 - nats restarting: unknown
            return None

    async def held(self, service: str) -> int | None:
        try:
            info = await asyncio.wait_for(self.js.consumer_info(subjects.STREAM, DURABLES[service]), 2)
            return info.num_ack_pending + info.num_pending  # in its hands, or waiting for it
        except Exception:  # noqa: BLE001 - nats restarting: unknown
            return None

    # --- runs --------------------------------------------------------------------------------------------

    async def start_run(self) -> None:
        rc, out, err = await self.cli(
            "run", "--locator", f"jsonl:{self.sample}", "--target", TARGET, "--max-steps", str(self.args.max_steps),
            "--set", f"checkpoint_every_steps={self.args.checkpoint_every}",
            *[a for kv in self.args.recipe_set for a in ("--set", kv)], "--no-wait", timeout=120)
        run_id = next((w for w in out.split() if w.startswith("run-")), None)
        if rc != 0 or not run_id:
            log(f"tuneline run exited {rc}: {(out + err)[-300:]}")
            self.runs[f"not-started-{len(self.runs)}"] = {"started": now(), "status": "not started", "rc": rc,
                                                           "output": (out + err)[-500:]}
            return
        self.runs[run_id] = {"started": now(), "status": "running"}
        log(f"started {run_id} ({len(self.runs)})")

    async def refresh_runs(self) -> None:
        ids = [r for r, v in self.runs.items() if v["status"] == "running"]
        if not ids:
            return
        rows = await self.query("SELECT run_id, status, reason_code FROM timeline_runs WHERE run_id = ANY($1)", ids)
        for r in rows or []:
            if r["status"] in ("succeeded", "failed") and self.runs[r["run_id"]]["status"] == "running":
                self.runs[r["run_id"]].update(status=r["status"], reason_code=r["reason_code"], ended=now())
                log(f"{r['run_id']} {r['status']}" + (f" ({r['reason_code']})" if r["reason_code"] else ""))

    def in_flight(self) -> int:
        return sum(1 for v in self.runs.values() if v["status"] == "running")

    # --- faults ------------------------------------------------------------------------------------------

    def plan(self) -> list[dict]:
        faults = [{"kind": "kill", "service": s} for s in (*STAGES, "audit", "api")]
        faults += [{"kind": "nats_restart"}, {"kind": "postgres_stop"}, {"kind": "artifacts_readonly"}]
        faults += [{"kind": "poison", "poison": p} for p in POISON_KINDS]
        faults.append({"kind": "concurrent_promotions"})
        if self.args.only:
            wanted = set(self.args.only.split(","))
            faults = [f for f in faults if {f["kind"], f"{f['kind']}:{f.get('service') or f.get('poison')}"} & wanted]
        self.rng.shuffle(faults)
        return faults

    def pids_of(self, name: str) -> list[int]:
        entry = (self.state().get("services") or {}).get(name) or {}
        return [r.get("pid") for r in entry.get("replicas") or []] or [entry.get("pid")]

    def dead_services(self, skip: set[int] = frozenset()) -> list[str]:
        return [n for n in (self.state().get("services") or {})
                if any(p not in skip and not stack.service_alive(p, n) for p in self.pids_of(n))]

    async def ready(self, fault: dict) -> bool:
        """Whether now is a point worth hitting: the killed stage holds a message (it is working)."""
        if fault["kind"] == "concurrent_promotions":
            rows = await self.query("SELECT count(*) AS n FROM run_events WHERE type = $1", REGISTERED[0])
            return bool(rows) and rows[0]["n"] >= 3
        if fault["kind"] == "kill" and fault["service"] in STAGES:
            n = await self.held(fault["service"])
            if fault["service"] == "trainer" and n:
                # mid-training, at a random step: wait for a random number of progress reports of the run
                return self.rng.random() < 0.35
            return bool(n)
        return self.in_flight() > 0

    async def inject(self, fault: dict) -> None:
        kind = fault["kind"]
        fault["at"] = iso(now())
        fault["runs_in_flight"] = self.in_flight()
        log(f"fault: {kind} {fault.get('service') or fault.get('poison') or ''}")
        if kind == "kill":
            await self.kill_service(fault)
        elif kind == "nats_restart":
            pid = self.state()["nats"]["pid"]
            t = now()
            self.killed_by_us.add(pid)
            os.kill(pid, signal.SIGKILL)
            fault.update(t_kill=t, pid=pid)
            await asyncio.sleep(self.rng.uniform(1, 5))
            fault["services_dead_before_up"] = self.dead_services()
            fault["up"] = await self.up("nats-server killed")
            fault["t_restarted"] = fault["up"]["done"]
        elif kind == "postgres_stop":
            t = now()
            fault["t_kill"] = t
            await asyncio.to_thread(stack.stop_postgres, Path(self.state()["postgres"]["pgdata"]))
            fault["stopped_s"] = round(now() - t, 2)
            await asyncio.sleep(30)
            fault["services_dead_before_up"] = self.dead_services()
            fault["up"] = await self.up("PostgreSQL stopped for 30 s")
            fault["t_restarted"] = fault["up"]["done"]
        elif kind == "artifacts_readonly":
            art = self.data_dir / "artifacts"
            art.mkdir(exist_ok=True)
            fault["t_kill"] = now()
            subprocess.run(["chattr", "-R", "+i", str(art)], check=True, capture_output=True)
            try:
                await asyncio.sleep(10)
            finally:
                subprocess.run(["chattr", "-R", "-i", str(art)], check=True, capture_output=True)
            fault["t_restarted"] = now()
            fault["services_dead_after"] = self.dead_services()
            if fault["services_dead_after"]:
                fault["up"] = await self.up("a service died while the artifacts were read-only")
        elif kind == "poison":
            await self.poison(fault)
        elif kind == "concurrent_promotions":
            await self.promotions(fault)
        fault["t_done"] = now()

    async def kill_service(self, fault: dict) -> None:
        name = fault["service"]
        pids = self.pids_of(name)
        # with replicas, the one at work (the most CPU in half a second): a held message is per durable, and
        # killing the idle replica would test nothing
        pid = await busiest(pids) if len(pids) > 1 else pids[0]
        fault["replicas"] = len(pids)
        busy = await self.held(name) if name in DURABLES else None
        seen = await self.delivered(name) if name in STAGES else None
        t = now()
        self.killed_by_us.add(pid)
        os.kill(pid, signal.SIGKILL)
        fault.update(t_kill=t, pid=pid, held_messages=busy)
        await asyncio.sleep(self.rng.uniform(0.5, 2))
        fault["up"] = await self.up(f"{name} killed")
        fault["t_restarted"] = fault["up"]["done"]
        if busy and seen is not None:
            # the stage resumes when a worker takes the message back (its next event may be a minute of work away:
            # the evaluator and export announce only their outcome)
            deadline = now() + 120
            while now() < deadline:
                n = await self.delivered(name)
                if n is not None and n > seen:
                    fault["t_redelivered"] = now()
                    break
                await asyncio.sleep(0.25)
        if name == "api":
            port = self.env["TUNELINE_API_PORT"]
            ok = await asyncio.to_thread(stack.http_ready, f"http://127.0.0.1:{port}/api/health", 60)
            fault["t_next"] = now() if ok else None

    async def poison(self, fault: dict) -> None:
        subject, consumer = POISON_SUBJECTS[fault["poison"]]
        event_id = str(uuid.uuid4())
        base = {"event_id": event_id, "schema_version": 1, "run_id": f"poison-{event_id[:8]}",
                "correlation_id": f"poison-{event_id[:8]}", "occurred_at": iso(now()), "producer": "faults",
                "severity": "info"}
        match fault["poison"]:
            case "non_json":
                data = b"\x00\xffthis is not JSON {"
            case "unknown_type":
                data = json.dumps({**base, "type": "faults.unknown_type", "payload": {}}).encode()
            case "invalid_payload":
                data = json.dumps({**base, "type": "eval.completed", "payload": {"bogus": True}}).encode()
            case _:
                data = json.dumps({**base, "type": "export.completed",
                                   "payload": {"padding": "x" * (2 * 1024 * 1024)}}).encode()
        fault.update(subject=subject, consumer=consumer, bytes=len(data), event_id=event_id)
        try:
            ack = await self.js.publish(subject, data, headers={"Nats-Msg-Id": event_id}, timeout=10)
            fault["stream_seq"] = ack.seq
        except Exception as exc:  # noqa: BLE001 - refused by the server: recorded, not a loss
            fault["publish_refused"] = f"{type(exc).__name__}: {exc}"
        fault["t_kill"] = now()
        await asyncio.sleep(8)

    async def promotions(self, fault: dict) -> None:
        rows = await self.query("SELECT DISTINCT (payload->>'version')::int AS v FROM run_events WHERE type = $1 "
                                "AND payload->>'target' = $2 ORDER BY 1 DESC", REGISTERED[0], TARGET)
        versions = [r["v"] for r in rows or []][:3]
        fault["versions"] = versions
        results = await asyncio.gather(*[
            self.cli("promote", TARGET, str(v), "--override", "--reason", "fault suite: concurrent promotion",
                     "--actor", "fault-suite", "--json", timeout=180) for v in versions])
        fault["outcomes"] = [{"version": v, "rc": rc, "said": (out.strip() or err.strip())[-300:]}
                             for v, (rc, out, err) in zip(versions, results)]
        fault["promoted"] = sum(1 for rc, _o, _e in results if rc == 0)
        fault["refused"] = sum(1 for rc, _o, _e in results if rc == 2)

    async def watchdog(self) -> None:
        """A service that died on its own (not killed by us) is a finding: recorded, then repaired by `up`."""
        dead = self.dead_services(skip=self.killed_by_us)
        if dead:
            log(f"services died on their own: {dead}")
            self.unexpected_deaths.append({"at": iso(now()), "services": dead})
            await self.up(f"died on their own: {', '.join(dead)}")

    # --- the drive ---------------------------------------------------------------------------------------

    async def drive(self) -> None:
        pending = self.plan()
        fault_at = now() + self.rng.uniform(10, 30)
        waited_since = None
        deadline = now() + self.args.max_minutes * 60
        last_watch = 0.0
        last_refresh = 0.0
        while now() < deadline:
            if now() - last_refresh > 2:
                last_refresh = now()
                await self.refresh_runs()
            started = len(self.runs)
            # runs keep coming while faults are pending, so that each fault meets a working stack
            want_more = started < self.args.runs or bool(pending)
            if want_more and self.in_flight() < self.args.concurrency:
                await self.start_run()
                last_refresh = 0.0
            if pending and now() >= fault_at:
                fault = pending[0]
                point = await self.ready(fault)
                if not point and fault["kind"] == "concurrent_promotions" and len(pending) > 1:
                    fault = pending[1]  # the target has fewer than three versions yet: the next fault first
                    point = await self.ready(fault)
                waited_since = waited_since or now()
                if point or now() - waited_since > self.args.wait_for_point_s:
                    fault["at_a_busy_point"] = point
                    await self.inject(fault)
                    pending.remove(fault)
                    self.faults.append(fault)
                    waited_since = None
                    fault_at = now() + self.rng.uniform(*self.args.gap_s)
            if now() - last_watch > 5:
                last_watch = now()
                await self.watchdog()
            if not pending and len(self.runs) >= self.args.runs and self.in_flight() == 0:
                break
            await asyncio.sleep(0.25)
        for f in pending:
            self.faults.append({**f, "skipped": "the suite's time ran out before it"})

    async def run(self) -> dict:
        if self.data_dir.exists() and any(self.data_dir.iterdir()) and not self.args.data_dir:
            raise SystemExit(f"{self.data_dir} is not empty")
        rc, out, _err = await self.cli("up", "--help")
        if "--replicas" in out:
            self.replicas = self.args.replicas
        log(f"data dir {self.data_dir}; tuneline up {'--replicas ' + self.replicas if self.replicas else ''}")
        first = await self.up("start")
        if first["rc"] != 0:
            raise SystemExit("tuneline up failed: " + first.get("output", ""))
        self.sample = self.data_dir / "sample.jsonl"
        rc, out, err = await self.cli("sample-data", str(self.sample), "--rows-per-label", str(self.args.rows_per_label))
        if rc != 0:
            raise SystemExit(f"sample-data failed: {out}{err}")
        await self.connect_nats()
        began = now()
        try:
            await self.drive()
            log("runs done; checking")
            figures = await self.check()
        finally:
            if self.nc is not None:
                await self.nc.close()
        figures["wall_s"] = round(now() - began, 1)
        return figures

    async def recheck(self, results: Path) -> dict:
        """The checks again, on the data directory of an earlier drive (its faults and runs from its results)."""
        if not self.args.data_dir:
            raise SystemExit("--recheck needs --data-dir: the data directory of the drive it checks")
        earlier = json.loads(results.read_text())
        self.faults, self.runs = earlier["faults"], earlier["runs"]
        self.earlier = earlier  # its seed and settings are the results' (amain)
        self.replicas = earlier["settings"].get("replicas") or ""
        if (await self.up("recheck"))["rc"] != 0:
            raise SystemExit("tuneline up failed")
        await self.connect_nats()
        for r in self.runs.values():
            if r["status"] == "not terminal":
                r["status"] = "running"  # it may have ended since: asked again
        await self.refresh_runs()
        try:
            fig = await self.check()
        finally:
            await self.nc.close()
        fig["wall_s"] = (earlier.get("figures") or {}).get("wall_s")
        fig["rechecked_from"] = str(results)
        return fig

    # --- the checks ----------------------------------------------------------------------------------------

    async def settle(self, timeout: float = 180) -> dict:
        """Wait until the recorder has accounted for every stream position (or timeout)."""
        deadline = now() + timeout
        while True:
            info = await self.js.stream_info(subjects.STREAM)
            rows = await self.query("SELECT (SELECT count(*) FROM run_events WHERE global_position <= $1) "
                                    "+ (SELECT count(*) FROM run_event_skipped_positions WHERE global_position <= $1) AS n",
                                    info.state.last_seq)
            accounted = rows[0]["n"] if rows else -1
            if accounted >= info.state.messages or now() > deadline:
                return {"stream_messages": info.state.messages, "last_seq": info.state.last_seq, "accounted": accounted}
            await asyncio.sleep(1)

    async def stream_ids(self, last_seq: int) -> dict[int, str | None]:
        out = {}
        for seq in range(1, last_seq + 1):
            try:
                msg = await self.js.get_msg(subjects.STREAM, seq)
            except Exception:  # noqa: BLE001 - deleted / not found: not a message of the stream
                continue
            out[seq] = (msg.headers or {}).get("Nats-Msg-Id")
        return out

    async def check(self) -> dict:
        fig: dict = {}
        await self.up("final: everything up before the checks")
        settled = await self.settle()
        fig["settled"] = settled
        # 1. runs terminal
        for run_id, r in self.runs.items():
            if r["status"] == "running":
                r["status"] = "not terminal"
        started = [r for r in self.runs.values() if r["status"] != "not started"]
        terminal = [r for r in started if r["status"] in ("succeeded", "failed")]
        fig["runs"] = {"started": len(started), "terminal": len(terminal),
                       "succeeded": sum(r["status"] == "succeeded" for r in started),
                       "failed": sum(r["status"] == "failed" for r in started),
                       "not_started": sum(r["status"] == "not started" for r in self.runs.values()),
                       "failure_reasons": sorted({r.get("reason_code") or "" for r in started if r["status"] == "failed"}),
                       "not_terminal": [k for k, r in self.runs.items() if r["status"] == "not terminal"]}
        # 2. events lost: the stream against run_events (+ positions the recorder accounted as skipped)
        ids = await self.stream_ids(settled["last_seq"])
        rows = await self.query("SELECT global_position, event_id::text AS id FROM run_events")
        skipped = await self.query("SELECT global_position, reason_code FROM run_event_skipped_positions")
        recorded = {r["global_position"]: r["id"] for r in rows or []}
        skipped_at = {r["global_position"]: r["reason_code"] for r in skipped or []}
        lost = [s for s in ids if s not in recorded and s not in skipped_at]
        mismatched = [s for s, i in ids.items() if s in recorded and i and i != recorded[s]]
        fig["events"] = {"stream": len(ids), "run_events": len(recorded), "skipped": len(skipped_at),
                         "skipped_reasons": sorted(set(skipped_at.values())), "lost": len(lost),
                         "lost_positions": lost[:50], "id_mismatches": mismatched[:50],
                         "not_in_stream": sorted(set(recorded) - set(ids))[:50]}
        # 3. duplicated effects
        fig["duplicates"] = await self.duplicates()
        # 4. training restarts and repeated steps
        fig["training"] = await self.training()
        # 5. recovery times
        fig["recovery"] = await self.recovery()
        # 6. poison
        fig["poison"] = await self.poison_outcomes()
        # 7. projections equal to a fresh rebuild
        fig["projections"] = await self.projections()
        # 8. the chain
        rc, out, err = await self.cli("audit", "verify", "--json", timeout=600)
        try:
            fig["chain"] = {"rc": rc, **json.loads(out)}
        except json.JSONDecodeError:
            fig["chain"] = {"rc": rc, "ok": False, "output": (out + err)[-800:]}
        fig["unexpected_deaths"] = self.unexpected_deaths
        sent = [o for f in self.faults if f["kind"] == "concurrent_promotions" for o in f.get("outcomes") or []]
        fig["promotions"] = {"sent": len(sent), "promoted": sum(o["rc"] == 0 for o in sent),
                             "refused": sum(o["rc"] == 2 for o in sent),
                             "reasons": sorted({o["said"].split("[", 1)[1].split("]", 1)[0] for o in sent
                                                if o["rc"] == 2 and "[" in o["said"]})}
        return fig

    async def duplicates(self) -> dict:
        rows = await self.query("SELECT run_id, type, count(*) AS n FROM run_events WHERE type = ANY($1) "
                                "GROUP BY run_id, type HAVING count(*) > 1", list(REGISTERED))
        versions = await self.query("SELECT payload->>'target' AS t, payload->>'version' AS v, count(*) AS n FROM run_events "
                                    "WHERE type = ANY($1) GROUP BY 1, 2 HAVING count(*) > 1", list(REGISTERED))
        jobs = await self.query("SELECT run_id, count(DISTINCT payload->>'hosted_job_id') AS n FROM run_events "
                                "WHERE payload ? 'hosted_job_id' AND payload->>'hosted_job_id' IS NOT NULL "
                                "GROUP BY run_id HAVING count(DISTINCT payload->>'hosted_job_id') > 1")
        # Promotions: each must demote the version that was production just before it (a lost update, two
        # promotions applied against one state, demotes the same version twice).
        acts = await self.query("SELECT global_position, type, payload FROM run_events WHERE type IN "
                                "('registry.promoted', 'registry.rolled_back', 'registry.restored') "
                                "AND payload->>'target' = $1 ORDER BY global_position", TARGET)
        bad = stale_acts([(a["global_position"], a["type"], a["payload"]) for a in acts or []])
        return {"two_versions_for_one_run": [dict(r) for r in rows or []],
                "one_version_number_twice": [dict(r) for r in versions or []],
                "two_hosted_jobs_for_one_run": [dict(r) for r in jobs or []],
                "promotions_on_a_stale_state": bad,
                "promotions": len([a for a in acts or [] if a["type"] == "registry.promoted"]),
                "total": len(rows or []) + len(versions or []) + len(jobs or []) + len(bad)}

    async def training(self) -> dict:
        """Every fault that stopped a trainer (kill -9 of one, or `up` restarting them all after nats-server or
        PostgreSQL): each run in training then must show a training.restarted resuming from its last checkpoint."""
        stops = [f for f in self.faults if f.get("t_kill") and (f.get("service") == "trainer"
                                                                 or f["kind"] in ("nats_restart", "postgres_stop"))]

        def pl(e):
            return json.loads(e["payload"]) if isinstance(e["payload"], str) else e["payload"]

        def stopped_at(f):  # a kill stops the trainer at once; after nats-server or PostgreSQL, `up` stops it
            return f["t_kill"] if f["kind"] == "kill" else f["t_restarted"] - ((f.get("up") or {}).get("wall_s") or 0)

        stops.sort(key=stopped_at)
        out = []
        for i, f in enumerate(stops):
            stopped = stopped_at(f)
            t_kill = datetime.fromtimestamp(stopped, timezone.utc)
            # this stop's attempt shows before the next stop's
            until = datetime.fromtimestamp(min(stopped + 120, stopped_at(stops[i + 1]) if i + 1 < len(stops) else 9e9),
                                           timezone.utc)
            rows = await self.query(
                "SELECT DISTINCT run_id FROM run_events WHERE producer = 'trainer' AND occurred_at <= $1 "
                "AND occurred_at > $1 - interval '15 minutes' AND (type LIKE 'training.%' OR type LIKE 'preflight.%') "
                # a trigger the trainer held before its first event (in preflight) shows by its training.restarted
                "UNION SELECT run_id FROM run_events WHERE type = 'training.restarted' AND occurred_at > $1 "
                "AND occurred_at <= $2", t_kill, until)
            for row in rows or []:
                ev = await self.query("SELECT global_position, type, occurred_at, payload FROM run_events "
                                      "WHERE run_id = $1 AND producer = 'trainer' ORDER BY global_position", row["run_id"])
                before = [e for e in ev if e["occurred_at"] <= t_kill]
                after = [e for e in ev if e["occurred_at"] > t_kill]
                if any(e["type"] in ("training.completed", "training.failed") for e in before):
                    continue  # its training was over before the fault
                reached = max([pl(e)["step"] for e in before if e["type"] in ("training.progress", "training.checkpointed")],
                              default=0)
                checkpoint = max([pl(e)["step"] for e in before if e["type"] == "training.checkpointed"], default=None)
                restarted = next((e for e in after if e["type"] == "training.restarted" and e["occurred_at"] <= until), None)
                if restarted is None and f.get("service") == "trainer" and f.get("replicas", 1) > 1:
                    continue  # another replica's run, untouched by this kill
                resumed = pl(restarted).get("resumed_from_step") if restarted else None
                item = {"fault": f.get("service") or f["kind"], "at": f["at"], "trainer_stopped_at": iso(stopped),
                        "run_id": row["run_id"],
                        "reported_step": reached, "last_checkpoint": checkpoint, "restarted_event": restarted is not None,
                        "delivery": pl(restarted).get("delivery") if restarted else None, "resumed_from_step": resumed,
                        "steps_repeated": max(0, reached - (resumed or 0)) if restarted else None,
                        "completed_after": any(e["type"] == "training.completed" for e in after)}
                # resumed from the last checkpoint seen before the stop, or a later one (training may go on while
                # nats is down, its checkpoint events published after): never from an earlier step
                item["ok"] = restarted is not None and (resumed or 0) >= (checkpoint or 0)
                out.append(item)
        return {"trainer_kills": out, "restarts_visible": sum(1 for i in out if i.get("restarted_event")),
                "steps_repeated": sum(i.get("steps_repeated") or 0 for i in out),
                "ok": all(i.get("ok", True) for i in out)}

    async def recovery(self) -> dict:
        out = {}
        for f in self.faults:
            if not f.get("t_kill") or f["kind"] not in ("kill", "nats_restart", "postgres_stop"):
                continue
            name = f.get("service") or f["kind"]
            t_kill = datetime.fromtimestamp(f["t_kill"], timezone.utc)
            if name == "api":
                t_next = f.get("t_next")
            elif name in STAGES:
                rows = await self.query("SELECT min(occurred_at) AS t FROM run_events WHERE producer = $1 AND occurred_at > $2",
                                        name, t_kill)
                t_next = rows[0]["t"].timestamp() if rows and rows[0]["t"] else None
            else:  # audit, nats, postgres: the next event recorded at all
                rows = await self.query("SELECT min(recorded_at) AS t FROM run_events WHERE recorded_at > $1", t_kill)
                t_next = rows[0]["t"].timestamp() if rows and rows[0]["t"] else None
            restarted = f.get("t_restarted")
            backlog = None
            if name == "audit" and restarted:
                # the recorder's recovery shows when something was published while it was down
                rows = await self.query("SELECT count(*) AS n FROM run_events WHERE occurred_at > $1 AND occurred_at <= $2",
                                        t_kill, datetime.fromtimestamp(restarted, timezone.utc))
                backlog = rows[0]["n"] if rows else None
            item = {"busy_at_kill": bool(f.get("held_messages")) if name in STAGES else None,
                    "kill_to_restarted_s": round(restarted - f["t_kill"], 1) if restarted else None,
                    "kill_to_next_event_s": round(t_next - f["t_kill"], 1) if t_next else None,
                    "restart_to_next_event_s": round(max(0.0, t_next - restarted), 1) if t_next and restarted else None,
                    "up_wall_s": (f.get("up") or {}).get("wall_s")}
            if f.get("held_messages") and name in STAGES:
                t_re = f.get("t_redelivered")
                item["kill_to_redelivered_s"] = round(t_re - f["t_kill"], 1) if t_re else None
                item["restart_to_redelivered_s"] = round(max(0.0, t_re - restarted), 1) if t_re and restarted else None
            # the goal holds for a stage that held a message (idle, its next event waits for the next run)
            item["published_while_down"] = backlog
            judged = (name == "api" or (name in ("nats_restart", "postgres_stop") and bool(f.get("runs_in_flight")))
                      or item["busy_at_kill"] or bool(backlog))
            item["judged"] = bool(judged)
            # a stage that held a message: judged on taking it back; the others on their next event
            resumed = item.get("restart_to_redelivered_s", item["restart_to_next_event_s"])
            item["ok"] = (not judged) or (resumed is not None and resumed <= RECOVERY_GOAL_S)
            out[name] = item
        return out

    async def poison_outcomes(self) -> dict:
        out = {}
        for f in self.faults:
            if f["kind"] != "poison":
                continue
            seq = f.get("stream_seq")
            item = {"subject": f["subject"], "bytes": f["bytes"], "stream_seq": seq,
                    "publish_refused": f.get("publish_refused")}
            if seq:
                rec = await self.query("SELECT type FROM run_events WHERE global_position = $1", seq)
                skip = await self.query("SELECT reason_code FROM run_event_skipped_positions WHERE global_position = $1", seq)
                dl = await self.query("SELECT reason_code, payload FROM run_events WHERE type = 'bus.message_dead_lettered' "
                                      "AND (payload->>'stream_sequence')::bigint = $1", seq)
                item["recorded_as"] = rec[0]["type"] if rec else None
                item["recorder_skipped"] = skip[0]["reason_code"] if skip else None
                item["dead_lettered"] = [r["reason_code"] for r in dl or []]
                item["ok"] = bool(rec or skip) and bool(dl)
            else:
                item["ok"] = bool(f.get("publish_refused"))
            out[f["poison"]] = item
        return out

    async def projections(self) -> dict:
        rc, out, err = await self.cli("replay", "projection", "timeline", "--json", timeout=600)
        try:
            rep = json.loads(out)
            timeline = {"identical": bool(rep.get("identical")), "differences": rep.get("differences"),
                        "version": rep.get("version"), "events": rep.get("events")}
        except json.JSONDecodeError:
            timeline = {"identical": False, "rc": rc, "output": (out + err)[-800:]}
        cols = "run_id, target, status, outcome, version, accuracy, gate_passed, override, reason_code, dataset_version"
        before = await self.query(f"SELECT {cols} FROM history_runs ORDER BY run_id")
        rc, out, err = await self.cli("rebuild", "history", timeout=600)
        after = await self.query(f"SELECT {cols} FROM history_runs ORDER BY run_id")
        b = {tuple(r.values()) for r in before or []}
        a = {tuple(r.values()) for r in after or []}
        history = {"identical": rc == 0 and b == a and before is not None, "rows": len(a), "rc": rc,
                   "only_before": [list(map(str, x)) for x in sorted(b - a, key=str)][:5],
                   "only_after": [list(map(str, x)) for x in sorted(a - b, key=str)][:5]}
        return {"timeline": timeline, "history": history}


def stale_acts(acts: list[tuple[int, str, dict | str]]) -> list[dict]:
    """The registry acts (position, type, payload) of one target, in order, that changed production on a stale
    state: each promotion, rollback and restore must demote the version that was production just before it
    (two promotions applied against one state demote the same version twice)."""
    production, bad = None, []
    for position, _type, payload in acts:
        p = json.loads(payload) if isinstance(payload, str) else payload
        if p.get("demoted") != production:
            bad.append({"position": position, "version": p["version"], "demoted": p.get("demoted"),
                        "production_before": production})
        production = p["version"]
    return bad


def table(fig: dict) -> tuple[list[tuple[str, str, str, bool]], bool]:
    rows = []
    r = fig["runs"]
    pct = 100.0 * r["terminal"] / r["started"] if r["started"] else 0.0
    rows.append(("runs terminal", f"{r['terminal']}/{r['started']} ({pct:.0f}%; {r['succeeded']} ok, {r['failed']} failed)",
                 "100%", r["started"] >= 20 and r["terminal"] == r["started"] and not r["not_started"]))
    e = fig["events"]
    rows.append(("events lost", f"{e['lost']} (stream {e['stream']}, run_events {e['run_events']}, skipped {e['skipped']})",
                 "0", e["lost"] == 0 and not e["id_mismatches"]))
    d = fig["duplicates"]
    rows.append(("duplicated effects", f"{d['total']} ({d['promotions']} promotions checked)", "0", d["total"] == 0))
    pr = fig.get("promotions")
    if pr is not None:
        rows.append(("concurrent promotions", f"{pr['promoted']} promoted, {pr['refused']} refused "
                     f"({', '.join(pr['reasons']) or '-'}) of {pr['sent']}", "<= 1 applied",
                     pr["promoted"] <= 1 and pr["promoted"] + pr["refused"] == pr["sent"]))
    t = fig["training"]
    kills = len(t["trainer_kills"])
    rows.append(("trainer restarts visible", f"{t['restarts_visible']}/{kills} kills; resumed from last checkpoint: "
                 f"{'yes' if t['ok'] else 'NO'}", "all", t["ok"]))
    rows.append(("steps repeated", str(t["steps_repeated"]), "(reported)", True))
    p = fig["projections"]
    rows.append(("projections = rebuild", f"timeline {'identical' if p['timeline']['identical'] else 'DIFFERS'}, "
                 f"history {'identical' if p['history']['identical'] else 'DIFFERS'}", "identical",
                 p["timeline"]["identical"] and p["history"]["identical"]))
    c = fig["chain"]
    rows.append(("chain verified", f"{'intact' if c.get('ok') else 'BROKEN'} ({c.get('checked')} rows)", "intact",
                 bool(c.get("ok"))))
    po = fig["poison"]
    rows.append(("poison handled", f"{sum(1 for v in po.values() if v['ok'])}/{len(po)}", "all",
                 len(po) == len(POISON_KINDS) and all(v["ok"] for v in po.values())))
    deaths = fig["unexpected_deaths"]
    rows.append(("services died unasked", str(sum(len(x["services"]) for x in deaths)), "0", not deaths))
    for name, rec in fig["recovery"].items():
        val = (f"kill->next event {rec['kill_to_next_event_s']}s, restart->next event {rec['restart_to_next_event_s']}s"
               + (f", restart->message taken back {rec['restart_to_redelivered_s']}s" if "restart_to_redelivered_s" in rec
                  else "") + f" (up {rec['up_wall_s']}s)" + ("" if rec["judged"] else ", idle at kill: not judged"))
        rows.append((f"recovery {name}", val, f"<= {RECOVERY_GOAL_S:.0f}s", rec["ok"]))
    return rows, all(ok for *_x, ok in rows)


async def amain(args) -> int:
    suite = Suite(args)
    figures: dict = {}
    try:
        figures = await (suite.recheck(Path(args.recheck)) if args.recheck else suite.run())
    finally:
        if not args.keep:
            rc, out, err = await suite.cli("down", timeout=120)
            log("tuneline down: " + ("ok" if rc == 0 else (out + err)[-300:]))
            if not args.data_dir:
                shutil.rmtree(suite.data_dir, ignore_errors=True)
    rows, ok = table(figures)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  {'goal':<10} {'':4} value")
    for name, value, goal, good in rows:
        print(f"{name:<{width}}  {goal:<10} {'ok' if good else 'MISS':4} {value}")
    result = {
        "suite": "faults", "at": iso(now()), "ok": ok, "seed": args.seed,
        "settings": {"runs": args.runs, "concurrency": args.concurrency, "rows_per_label": args.rows_per_label,
                     "max_steps": args.max_steps, "checkpoint_every_steps": args.checkpoint_every,
                     "recipe_set": args.recipe_set, "gap_s": list(args.gap_s),
                     "replicas": suite.replicas or None},
        "machine": {"cpus": os.cpu_count(), "shared": True, "note": "a shared 2-core machine; times are indicative"},
        "table": [{"figure": n, "value": v, "goal": g, "ok": good} for n, v, g, good in rows],
        "figures": figures,
        "faults": [{k: v for k, v in f.items() if k not in ("up",)} | ({"up": {k: v for k, v in f["up"].items() if k != "done"}}
                                                                    if f.get("up") else {}) for f in suite.faults],
        "runs": suite.runs, "ups": [{k: v for k, v in u.items() if k != "done"} for u in suite.ups],
    }
    if getattr(suite, "earlier", None):  # a recheck: the drive's seed and settings, not this command's defaults
        result.update(seed=suite.earlier.get("seed"), settings=suite.earlier.get("settings"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}; {'every figure met its goal' if ok else 'a figure MISSED its goal'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="demo runs (more are started while faults remain)")
    p.add_argument("--concurrency", type=int, default=3, help="runs in flight at once")
    p.add_argument("--rows-per-label", type=int, default=15, help="the sample dataset's size (4 labels)")
    p.add_argument("--max-steps", type=int, default=3)
    p.add_argument("--checkpoint-every", type=int, default=1, help="the recipe's checkpoint_every_steps")
    p.add_argument("--recipe-set", action="append", default=None, metavar="FIELD=VALUE",
                   help="more recipe overrides for the runs (default: max_length=32, batch_size=8: small and fast)")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--gap-s", type=float, nargs=2, default=(10.0, 30.0), metavar=("MIN", "MAX"),
                   help="seconds between two faults, drawn uniformly")
    p.add_argument("--wait-for-point-s", type=float, default=120.0,
                   help="how long a kill waits for its stage to hold a message before it fires anyway")
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--replicas", default="trainer=2,evaluator=2", help="passed to `tuneline up` when it knows --replicas")
    p.add_argument("--only", default=None, metavar="FAULTS",
                   help="a subset of the faults, comma-separated: kill, kill:trainer, poison:non_json, nats_restart, "
                        "postgres_stop, artifacts_readonly, concurrent_promotions (a smoke test; the goals still apply)")
    p.add_argument("--recheck", default=None, metavar="RESULTS",
                   help="only the checks, again, on the --data-dir of the drive that wrote RESULTS (faults.json)")
    p.add_argument("--data-dir", default=None, help="default: a fresh temporary directory, deleted afterwards")
    p.add_argument("--keep", action="store_true", help="leave the stack up (and the data dir) for a look")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.recipe_set is None:
        args.recipe_set = ["max_length=32", "batch_size=8"]
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
