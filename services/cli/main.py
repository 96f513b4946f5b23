"""The `tuneline` command: run the local stack, start runs and follow them, query the audit trail."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from contracts import subjects
from contracts.commands import StartRun
from contracts.common import HostedSettings, RunPlan
from services.cli import (audit_cmds, eval_cmds, follow, history_cmds, import_cmds, ingest_cmds, registry_cmds, stack,
                          token_cmds)
from services.cli.errors import validation_lines
from services.cli.render import timeline_text
from services.common.ids import new_run_id
from services.common.logging import configure_logging
from services.common.redact import url_passwords


def data_dir() -> Path:
    return Path(os.environ.get("TUNELINE_DATA_DIR", ".tuneline")).resolve()


# The NATS user a command acts as (services/common/nats_auth.py): `cli` publishes commands only; the operator's
# verbs that declare streams or write history (up, migrate, import, replay) act as admin. main() sets it.
OPERATOR_COMMANDS = ("up", "migrate", "import", "replay")
nats_user = "cli"


def urls(user: str | None = None) -> tuple[str, str]:
    """NATS and database URLs: from the environment, else from the running embedded stack. The NATS URL
    carries the user's credentials for the stack's own nats-server (stack.client_nats_url)."""
    state = stack.read_state(data_dir()) or {}
    nats_url = os.environ.get("NATS_URL") or state.get("nats", {}).get("url")
    db_url = os.environ.get("DATABASE_URL") or state.get("postgres", {}).get("url")
    if not nats_url or not db_url:
        sys.exit("no stack: run `tuneline up` first, or set NATS_URL and DATABASE_URL")
    return stack.client_nats_url(data_dir(), nats_url, state, user or nats_user), db_url


class StackUnreachable(Exception):
    """A server the command needs is not answering: main() prints the one-line message, exit status 1."""


async def _quiet(_exc: Exception) -> None:
    pass  # connection errors become one StackUnreachable line, not a logged traceback per attempt


async def _js(nats_url: str):
    import nats

    try:
        nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=2, reconnect_time_wait=0.5,
                                error_cb=_quiet)
    except Exception as exc:  # noqa: BLE001 - NoServersError, OSError, timeouts: all mean "not there"
        from services.common.nats_auth import without_credentials

        raise StackUnreachable(f"nats-server at {without_credentials(nats_url)} is not reachable ({type(exc).__name__}): "
                               "run `tuneline up`") from None
    return nc, nc.jetstream()


async def _db(db_url: str):
    """A connection as tuneline_app; an unreachable server is a StackUnreachable, not a traceback."""
    import asyncpg

    from services.audit.db import connect_as_app

    try:
        return await connect_as_app(db_url)
    except (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError,
            asyncpg.ConnectionDoesNotExistError) as exc:
        raise StackUnreachable(f"PostgreSQL at {url_passwords(db_url)} is not reachable ({type(exc).__name__}): "
                               "run `tuneline up`") from None


# --- up / down / status --------------------------------------------------------------------


async def _prepare(nats_url: str, db_url: str) -> None:
    from services.audit.migrate import migrate
    from services.common.bus import declare_streams

    nc, js = await _js(nats_url)
    try:
        await declare_streams(js)
    finally:
        await nc.close()
    await migrate(db_url)


async def _wait_ready(nats_url: str, durables: list[str], timeout: float = 90.0) -> list[str]:
    nc, js = await _js(nats_url)
    try:
        deadline = time.monotonic() + timeout
        missing = list(durables)
        while missing and time.monotonic() < deadline:
            for d in list(missing):
                try:
                    await js.consumer_info(subjects.STREAM, d)
                    missing.remove(d)
                except Exception:  # noqa: BLE001 - not there yet
                    pass
            await asyncio.sleep(0.3)
        return missing
    finally:
        await nc.close()


DURABLES = {
    "ingest": "ingest-run-start", "prep": "prep-ingest-committed", "trainer": "trainer-prep-prepared",
    "evaluator": "evaluator-training-completed", "export": "export-eval-completed",
    "registry": "registry-export-completed", "audit": "audit-recorder",
}


def _ensure_nats(root: Path, recorded: dict | None) -> tuple[dict, bool]:
    """The stack's nats-server: the recorded one when it is alive and listening, else a new one on the
    same port and the same store. Never two on one store: any other nats-server found serving it is
    stopped first. Returns (state entry, whether a server was started)."""
    from services.common.nats_auth import ensure_credentials, read_credentials

    recorded = recorded if (recorded or {}).get("managed") else {}
    store = (root / "nats" / "jetstream").resolve()
    on_store = set(stack.nats_pids_for_store(store))
    pid, url = recorded.get("pid"), recorded.get("url")
    # a server started with users whose passwords are lost would refuse every service: restart it
    lost = recorded.get("auth") and read_credentials(root) is None
    if stack.nats_alive(pid) and stack.port_open("127.0.0.1", stack.port_of(url)) and not lost:
        for stray in sorted(on_store - {pid}):
            print(f"nats-server   stopping pid {stray}: a second server on {store}", file=sys.stderr)
            stack.stop_pid(stray)
        print(f"nats-server   {url} (running, pid {pid})")
        return recorded, False
    for old in sorted(on_store | ({pid} if stack.nats_alive(pid) else set())):
        stack.stop_pid(old)  # hung, or not the recorded one: the store gets exactly one writer
    port = stack.port_of(url)
    if port and stack.port_open("127.0.0.1", port):
        print(f"nats-server   port {port} is taken by another process; using a new port", file=sys.stderr)
        port = None
    n = stack.start_nats(root / "nats", port, passwords=ensure_credentials(root))
    print(f"nats-server   {n.url} (JetStream, sync_interval: always, store {n.store_dir}; a user per service)")
    return {"url": n.url, "pid": n.pid, "managed": True, "log": str(n.log), "auth": True}, True


def _ensure_postgres(root: Path, recorded: dict | None) -> tuple[dict, bool]:
    """The stack's PostgreSQL: reused when its postmaster is alive, else started on the same pgdata
    (same unix-socket URL). Returns (state entry, whether it was started)."""
    recorded = recorded if (recorded or {}).get("managed") else {}
    pgdata = Path(recorded.get("pgdata") or root / "postgres" / "pgdata").resolve()
    was_alive = stack.postgres_alive(pgdata)
    if recorded.get("url") and was_alive:
        print(f"postgresql    {url_passwords(recorded['url'])} (running)")
        return recorded, False
    pg = stack.start_postgres(root / "postgres")  # attaches when a postmaster is (still) there
    print(f"postgresql    {url_passwords(pg.url)}")
    return {"url": pg.url, "pgdata": str(pg.pgdata), "managed": True}, not was_alive


def cmd_up(args) -> int:
    """Bring the stack to "everything up", from whatever stack.json records: live parts are reused, dead
    ones restarted (the nats-server on its port and store), and every pid is recorded for `down`."""
    root = data_dir()
    old = stack.read_state(root) or {}
    try:
        asked = stack.parse_replicas(getattr(args, "replicas", None))
    except ValueError as exc:
        print(f"tuneline up: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "standby", None) is not None:  # a second audit process waits as the recorder's standby
        asked["audit"] = 2 if args.standby else 1  # (services/audit/lease.py); remembered like the replicas
    # How many instances of each service: --replicas, else what the last `up` was asked for, else 1.
    want = {n: {**(old.get("replicas") or {}), **asked}.get(n, 1) for n in stack.SERVICES}
    state = {"data_dir": str(root), "services": {}, "replicas": {n: k for n, k in want.items() if k != 1}}
    if old.get("settings") is not None:
        state["settings"] = old["settings"]  # what the running services were started with
    # Services alive now, recorded or not (a lost stack.json must not orphan them): `want` kept per service.
    alive: dict[str, list[int]] = stack.service_pids_for(root)
    recorded = {name: stack.replica_pids(s) for name, s in (old.get("services") or {}).items()}
    logs = {r.get("pid"): r.get("log") for s in (old.get("services") or {}).values()
            for r in (s.get("replicas") or [s])}
    for name, pids in recorded.items():
        for pid in pids:
            if name in stack.SERVICES and stack.service_alive(pid, name) and pid not in alive.get(name, []):
                alive.setdefault(name, []).append(pid)
    for name, pids in alive.items():
        mine = recorded.get(name, [])
        pids.sort(key=lambda p: mine.index(p) if p in mine else len(mine))  # the recorded ones first
        kept = [{"pid": p, "log": logs.get(p) or str(stack.replica_log(root, name, i + 1))}
                for i, p in enumerate(pids[:want[name]])]
        state["services"][name] = {"pid": kept[0]["pid"], "log": kept[0]["log"], "replicas": kept}
    stack.write_state(root, {**old, **state})  # `down` can stop what is alive even if the rest fails

    restarted = False
    if os.environ.get("NATS_URL"):
        state["nats"] = {"url": os.environ["NATS_URL"], "managed": False}
    else:
        state["nats"], started = _ensure_nats(root, old.get("nats"))
        restarted |= started
        stack.write_state(root, {**old, **state})
    if os.environ.get("DATABASE_URL"):
        state["postgres"] = {"url": os.environ["DATABASE_URL"], "managed": False}
    else:
        state["postgres"], started = _ensure_postgres(root, old.get("postgres"))
        restarted |= started
    stack.write_state(root, state)

    env = stack.service_env(root, state["nats"]["url"], state["postgres"]["url"])
    env.setdefault("TUNELINE_API_PORT", str(stack.api_port(old.get("api"))))
    state["api"] = {"url": f"http://127.0.0.1:{env['TUNELINE_API_PORT']}", "port": int(env["TUNELINE_API_PORT"])}
    stack.write_state(root, state)
    settings = stack.service_settings(env)
    # services kept running keep the settings they started with: say which ones the environment changed
    drift = [] if restarted or not alive else stack.settings_drift(old.get("settings"), settings)
    healthy = not restarted and all(len(alive.get(n, [])) == want[n] for n in stack.SERVICES)
    if healthy:
        print(f"already up ({root}); `tuneline status` for details")
        for line in drift:
            print(line, file=sys.stderr)
        return 0

    for name, pids in alive.items():
        # Duplicates (beyond the replicas asked for) always go; with nats or PostgreSQL restarted under
        # them, every service restarts.
        for pid in pids[(0 if restarted else want[name]):]:
            stack.stop_pid(pid)
        if restarted:
            state["services"].pop(name, None)
    stack.write_state(root, state)
    asyncio.run(_prepare(stack.client_nats_url(root, state["nats"]["url"], state, "admin"), state["postgres"]["url"]))
    roots = json.loads(env["TUNELINE_INGEST_ROOTS"])
    if "TUNELINE_INGEST_ROOTS" not in os.environ and len(roots) == 1:
        print(f"ingest roots: {roots[0]} only (up ran in {Path.cwd().resolve()}); set TUNELINE_INGEST_ROOTS to "
              "read files elsewhere", file=sys.stderr)
    if restarted or not alive or old.get("settings") is None:
        state["settings"] = settings  # every service starts now (or nothing was recorded to compare with)
    started_now: set[int] = set()
    for name in stack.SERVICES:
        have = (state["services"].get(name) or {}).get("replicas") or []
        while len(have) < want[name]:
            used = {r["log"] for r in have}
            i = next(i for i in range(1, 2 * stack.MAX_REPLICAS + 2) if str(stack.replica_log(root, name, i)) not in used)
            # each service connects as its own NATS user (services/common/nats_auth.py)
            pid = stack.start_service(name, root, {**env, **stack.service_credentials(root, name, state["nats"])}, i)
            have.append({"pid": pid, "log": str(stack.replica_log(root, name, i))})
            started_now.add(pid)
            state["services"][name] = {"pid": have[0]["pid"], "log": have[0]["log"], "replicas": have}
            stack.write_state(root, state)
    state["services"] = {n: state["services"][n] for n in stack.SERVICES}
    stack.write_state(root, state)
    admin_url = stack.client_nats_url(root, state["nats"]["url"], state, "admin")
    missing = asyncio.run(_wait_ready(admin_url, [DURABLES[s] for s in stack.SERVICES if s in DURABLES]))
    if not stack.http_ready(state["api"]["url"] + "/api/health"):
        missing.append("api")  # no durable consumer: ready when it answers
    for name in stack.SERVICES:
        replicas = state["services"][name]["replicas"]
        for i, r in enumerate(replicas, 1):
            ok = DURABLES.get(name, name) not in missing and stack.service_alive(r["pid"], name)
            how = "started" if r["pid"] in started_now else "running"
            label = name if len(replicas) == 1 else f"{name}[{i}]"
            print(f"{label:<13} {'up' if ok else 'NOT READY'} pid {r['pid']} ({how})")
    from services.common.tokens import ensure_admin

    admin = asyncio.run(ensure_admin(state["postgres"]["url"]))
    print(f"web page and API {state['api']['url']}" + (f"  admin token (shown once): {admin}" if admin else ""))
    for line in drift:
        print(line, file=sys.stderr)
    if missing:
        print(f"services not ready: {missing}; see {root / 'logs'}", file=sys.stderr)
        return 1
    return 0


def cmd_down(args) -> int:
    root = data_dir()
    state = stack.read_state(root)
    strays = stack.service_pids_for(root)  # services of this data dir that stack.json lost track of
    store = (root / "nats" / "jetstream").resolve()
    pgdata = root / "postgres" / "pgdata"
    if not state and not strays and not stack.nats_pids_for_store(store) and not stack.postgres_alive(pgdata):
        print("nothing to stop")
        return 0
    state = state or {}
    for name in stack.SERVICES:
        pids = set(strays.get(name, []))
        for recorded in stack.replica_pids((state.get("services") or {}).get(name)):
            if stack.service_alive(recorded, name):
                pids.add(recorded)
        for pid in sorted(pids):
            stack.stop_pid(pid)
        if pids:
            print(f"{name:<13} stopped" + (f" ({len(pids)} instances)" if len(pids) > 1 else ""))
    state["services"] = {}
    nats_pids = set(stack.nats_pids_for_store(store))
    if state.get("nats", {}).get("managed") and stack.nats_alive(state["nats"].get("pid")):
        nats_pids.add(state["nats"]["pid"])
    for pid in sorted(nats_pids):
        stack.stop_pid(pid)
    if nats_pids:
        print("nats-server   stopped")
    if state.get("postgres", {}).get("managed"):
        stack.stop_postgres(Path(state["postgres"]["pgdata"]))
        print("postgresql    stopped")
    elif not state.get("postgres") and stack.postgres_alive(pgdata):
        stack.stop_postgres(pgdata)  # ours (under the data dir), though stack.json did not record it
        print("postgresql    stopped")
    stack.state_path(root).unlink(missing_ok=True)
    return 0


async def _status() -> dict:
    from services.audit.recorder import find_gaps, recorder_lag

    nats_url, db_url = urls()
    out: dict = {"services": {}}
    state = stack.read_state(data_dir()) or {}
    for name in stack.SERVICES:
        entry = (state.get("services") or {}).get(name, {})
        pids = stack.replica_pids(entry) or [None]
        replicas = [{"pid": p, "alive": stack.service_alive(p, name)} for p in pids]
        out["services"][name] = {"pid": pids[0], "alive": all(r["alive"] for r in replicas), "replicas": replicas}
    nc, js = await _js(nats_url)
    try:
        conn = await _db(db_url)
    except StackUnreachable:
        await nc.close()
        raise
    try:
        info = await js.stream_info(subjects.STREAM)
        dlq = await js.stream_info(subjects.DLQ_STREAM)
        out["stream"] = {"name": subjects.STREAM, "messages": info.state.messages, "last_seq": info.state.last_seq,
                         "dlq_messages": dlq.state.messages}
        out["recorder"] = await recorder_lag(conn, js, subjects.STREAM)
        out["recorder"]["gaps"] = await find_gaps(conn)
        out["recorder"].update(await recorder_roles(conn))
        roles = {i["pid"]: "standby" for i in out["recorder"]["standbys"]}
        if out["recorder"]["active"]:
            roles[out["recorder"]["active"]["pid"]] = "active"
        for r in out["services"]["audit"].get("replicas") or []:
            r["role"] = roles.get(r["pid"])  # None: not connected to PostgreSQL (starting, or stuck)
        checkpoints = {r["projection"]: dict(r) for r in await conn.fetch(
            "SELECT * FROM projection_checkpoints WHERE projection IN ('timeline', 'history')")}
        out["projections"] = {name: checkpoints.get(name) or {"position": 0} for name in ("timeline", "history")}
        out["projection"] = out["projections"]["timeline"]  # before History was reported: kept for scripts
        for name in stack.SERVICES:
            try:
                ci = await js.consumer_info(subjects.STREAM, DURABLES[name])
                out["services"][name].update(pending=ci.num_pending, ack_pending=ci.num_ack_pending)
            except Exception:  # noqa: BLE001
                out["services"][name].update(pending=None)
    finally:
        await conn.close()
        await nc.close()
    return out


async def recorder_roles(conn) -> dict:
    """Which audit process is the active recorder and which are standbys (services/audit/lease.py), from
    the recorder lock's holder and waiters: {"active": {"pid", "host", "since"} | None, "standbys": [...]}."""
    from services.audit.lease import holders, instance_of

    rows = await holders(conn)
    return {"active": next((instance_of(h) for h in rows if h["granted"]), None),
            "standbys": [instance_of(h) for h in rows if not h["granted"]]}


def _recorder_instance(inst: dict) -> str:
    return f"pid {inst['pid']}" + (f" on {inst['host']}" if inst.get("host") else "")


def cmd_status(args) -> int:
    st = asyncio.run(_status())
    # Both modes: 1 when a service is down or a projection (timeline, History) has stopped on an error.
    rc = 0 if all(s["alive"] for s in st["services"].values()) and not any(
        p.get("error_position") for p in st["projections"].values()) else 1
    if args.json:
        print(json.dumps(st, default=str, indent=2))
        return rc
    for name, s in st["services"].items():
        replicas = s.get("replicas") or [s]
        pids = ", ".join(str(r["pid"]) + ("" if r["alive"] else " DOWN") + (f" ({r['role']})" if r.get("role") else "")
                         for r in replicas)
        print(f"{name:<10} {'up  ' if s['alive'] else 'DOWN'} {'pids' if len(replicas) > 1 else 'pid'} {pids}  "
              f"pending {s.get('pending')}  unacked {s.get('ack_pending')}")
    s = st["stream"]
    print(f"stream {s['name']}: {s['messages']} messages, last seq {s['last_seq']}; DLQ {s['dlq_messages']}")
    r = st["recorder"]
    print(f"recorder: recorded up to {r['recorded_position']}, lag {r['lag']}, gaps {r['gaps'] or 'none'}")
    active, standbys = r.get("active"), r.get("standbys") or []
    print(f"recorder: active {_recorder_instance(active) if active else 'NONE (no audit process holds the lock)'}; "
          f"standby {', '.join(_recorder_instance(s) for s in standbys) if standbys else 'none'}")
    for name, p in st["projections"].items():
        print(f"{name} projection: position {p.get('position')}"
              + (f", STOPPED at {p['error_position']}: {p['error']}" if p.get("error_position") else ""))
    return rc


# --- run / timeline / events ----------------------------------------------------------------


def absolute_locator(locator: str) -> str:
    # Services run elsewhere (another cwd, another host): a relative file path would mean nothing there.
    scheme, sep, rest = locator.partition(":")
    if sep and scheme in ("jsonl", "csv") and rest and not os.path.isabs(rest):
        return f"{scheme}:{os.path.abspath(rest)}"
    if sep and scheme == "hf":
        # a local dataset directory as the ingest locator parser tells one from a hub id: ./x, ../x,
        # . or .., or a directory that exists here (absolute and ~ paths mean the same there)
        ident, colon, tail = rest.partition(":")
        if colon and ident and not ident.startswith(("/", "~")) and (
                ident.startswith(("./", "../")) or ident in (".", "..") or os.path.isdir(ident)):
            return f"hf:{os.path.abspath(ident)}:{tail}"
    return locator


async def publish_command(cmd, *, prefix: str = "run", run_id: str | None = None) -> str:
    """Publish a command as the first event of a new run (or, with run_id, into that run); returns the run id."""
    from services.common.bus import publish
    from services.common.commands import envelope_of

    if run_id is None:
        run_id = new_run_id() if prefix == "run" else f"{prefix}-{new_run_id()}"
    env = envelope_of(cmd, run_id, "cli")
    nats_url, _ = urls()
    nc, js = await _js(nats_url)
    try:
        await publish(js, env, subjects.subject_for(env.type, kind="command"))
    finally:
        await nc.close()
    return run_id


# RunPlan/StartRun fields -> the `tuneline run` option that sets them, for validation messages.
RUN_OPTIONS = {
    "locator": "--locator", "target": "--target", "text_field": "--text-field", "label_field": "--label-field",
    "mapping": "--map", "force_mapping": "--force", "eval_locator": "--eval-locator", "max_steps": "--max-steps",
    "eval_fraction": "--eval-fraction", "seed": "--seed", "base_model": "--base-model", "recipe": "--recipe",
    "validation_fraction": "--validation-fraction", "new_test_set": "--new-test-set", "evaluation": "--evaluation",
    "recipe_overrides": "--set", "cleaning": "--set clean.", "backend": "--backend", "preflight": "--preflight", "requested_by": "$USER",
    ("hosted", "model"): "--hosted-model", ("hosted", "base_url"): "--hosted-base-url",
    ("hosted", "api_key_env"): "--api-key-env",
    "tuning": "--tune", ("tuning", "trials"): "--tune", ("tuning", "budget_minutes"): "--budget",
    ("tuning", "space"): "--tune-space",
}


def build_start_run(args) -> StartRun:
    """The StartRun command for `tuneline run`'s options; raises pydantic's ValidationError on bad input."""
    from services.cli.ingest_cmds import parse_map
    from services.cli.run_options import split_overrides, with_min_per_class

    overrides, cleaning = split_overrides(parse_settings(args.set))
    cleaning = with_min_per_class(cleaning, getattr(args, "min_per_class", None))
    plan = RunPlan(locator=absolute_locator(args.locator), target=args.target, text_field=args.text_field,
                   label_field=args.label_field, mapping=parse_map(args.map), force_mapping=args.force,
                   eval_locator=absolute_locator(args.eval_locator) if args.eval_locator else None,
                   max_steps=args.max_steps, eval_fraction=args.eval_fraction, seed=args.seed,
                   validation_fraction=args.validation_fraction, new_test_set=args.new_test_set,
                   **({"evaluation": args.evaluation_settings} if getattr(args, "evaluation_settings", None) else {}),
                   base_model=args.base_model, recipe=args.recipe, recipe_overrides=overrides,
                   cleaning=cleaning, backend=args.backend, preflight=args.preflight,
                   hosted=HostedSettings(model=args.hosted_model, base_url=args.hosted_base_url,
                                         api_key_env=args.api_key_env) if args.backend != "local" else None,
                   **tuning_of(args))
    return StartRun(plan=plan, requested_by=os.environ.get("USER", "cli"))


def tuning_of(args) -> dict:
    """The plan's `tuning` for `--tune N --budget MINUTES --tune-space FIELD=[...]` ({} without --tune)."""
    from services.cli.run_options import DEFAULT_BUDGET_MINUTES, parse_tune_space

    if getattr(args, "tune", None) is None:
        return {}
    space = {k: v for k, v in parse_tune_space(args.tune_space).items() if isinstance(v, list)}  # the rest: tuning_problems
    budget = DEFAULT_BUDGET_MINUTES if args.budget is None else args.budget
    return {"tuning": {"trials": args.tune, "budget_minutes": budget, "space": space}}


def parse_settings(pairs: list[str] | None) -> dict:
    """`--set field=value` pairs as recipe overrides; values are JSON when they parse (numbers, null,
    lists), strings otherwise."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects field=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


async def _run_recorded(run_id: str) -> bool:
    conn = await _db(urls()[1])
    try:
        return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM run_events WHERE run_id = $1)", run_id)
    finally:
        await conn.close()


def cmd_train_control(args) -> int:
    from contracts.commands import CancelTraining, PauseTraining, ResumeTraining

    cls = {"cancel": CancelTraining, "pause": PauseTraining, "resume": ResumeTraining}[args.action]
    if not asyncio.run(_run_recorded(args.run_id)):
        # a command for a run nobody started would only make a run of its own in the timeline
        print(f"no run {args.run_id} is recorded: nothing sent (`tuneline events --run RUN` lists a run's events)",
              file=sys.stderr)
        return 1
    asyncio.run(publish_command(cls(requested_by=os.environ.get("USER", "cli"), reason=args.reason),
                                run_id=args.run_id))
    print(f"{args.action} sent to {args.run_id}; `tuneline timeline {args.run_id}` shows when the trainer acts on it")
    return 0


def cmd_recipes(args) -> int:
    from services.trainer.recipes import RECIPES

    if args.json:
        print(json.dumps({name: r.model_dump(mode="json") for name, r in sorted(RECIPES.items())}, indent=2))
        return 0
    for name, r in sorted(RECIPES.items()):
        print(f"{name:24} {r.task:28} {r.method:6} {r.base_model}")
        print(f"{'':24} {r.description}")
        print(f"{'':24} lr={r.learning_rate:g} batch={r.batch_size} max_length={r.max_length} epochs={r.epochs:g} "
              f"lora_r={r.lora_r} patience={r.patience}")
    from services.trainer.hosted.cutoffs import closing_lines

    print("\n" + "\n".join(closing_lines()))
    return 0


def follow_and_print(run_id: str, timeout: float) -> int:
    """Follow a run from the bus to its end (services/cli/follow.py); the exit status says how it ended."""
    return follow.follow_and_print(sys.modules[__name__], run_id, timeout)


def run_option_problems(args) -> list[str]:
    """What is wrong with `tuneline run`'s target, recipe and `--set` options, one line each; checked
    before publishing, so a typo fails at the prompt rather than in the trainer minutes later."""
    from services.cli.run_options import (cleaning_problems, min_per_class_problems, recipe_problems, split_overrides,
                                          target_problem, tuning_problems)

    overrides, cleaning = split_overrides(parse_settings(args.set))
    problems = [p for p in [target_problem(args.target)] if p]
    return (problems + recipe_problems(args.recipe, overrides) + cleaning_problems(cleaning)
            + min_per_class_problems(cleaning, args.min_per_class)
            + tuning_problems(getattr(args, "tune", None), getattr(args, "budget", None), getattr(args, "tune_space", None),
                              args.backend))


def cmd_run(args) -> int:
    from pydantic import ValidationError

    lines = [f"tuneline run: {line}" for line in run_option_problems(args)]
    if args.evaluation:
        try:
            args.evaluation_settings = eval_cmds.load_evaluation_file(args.evaluation)
        except ValueError as exc:
            lines.append(f"tuneline run: --evaluation: {exc}")
    try:
        cmd = build_start_run(args)
    except ValidationError as exc:
        # the target and the cleaning knobs were checked above, with better messages
        lines += [line for line in validation_lines(exc, "tuneline run", RUN_OPTIONS)
                  if not line.startswith(("tuneline run: --target:", "tuneline run: --set clean."))]
    if lines:
        for line in lines:
            print(line, file=sys.stderr)
        return 2  # a usage error, like argparse's
    run_id = asyncio.run(publish_command(cmd))
    print(f"started {run_id} (correlation id {run_id})", flush=True)
    if args.no_wait:
        return 0
    return follow_and_print(run_id, args.timeout)


async def _timeline(run_id: str) -> dict | None:
    from services.audit.projections.timeline import run_timeline

    conn = await _db(urls()[1])
    try:
        return await run_timeline(conn, run_id)
    finally:
        await conn.close()


def cmd_timeline(args) -> int:
    tl = asyncio.run(_timeline(args.run_id))
    if tl is None:
        print(f"no run {args.run_id!r} in the timeline", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(tl, default=str, indent=2))
    else:
        print(timeline_text(tl))
    return 0


async def _events(run_id: str) -> list[dict]:
    conn = await _db(urls()[1])
    try:
        rows = await conn.fetch("SELECT * FROM run_events WHERE run_id = $1 ORDER BY global_position", run_id)
    finally:
        await conn.close()
    out = []
    for r in rows:
        d = dict(r)
        d["payload"] = json.loads(d["payload"])
        out.append(d)
    return out


def cmd_events(args) -> int:
    events = asyncio.run(_events(args.run))
    if args.json:
        print(json.dumps(events, default=str, indent=2))
    elif not events:
        print(f"no events recorded for run {args.run}", file=sys.stderr)
    else:
        for e in events:
            print(f"{e['global_position']:>8} {e['occurred_at']:%H:%M:%S} {e['type']:<28} {e['producer']:<10} "
                  f"{e['reason_code'] or ''}")
    return 0 if events else 1


def cmd_artifacts(args) -> int:
    from services.cli.artifacts_cmd import artifacts_text, materialise, run_artifacts
    from services.common.artifacts import ArtifactIntegrityError

    events = asyncio.run(_events(args.run_id))
    if not events:
        print(f"no events recorded for run {args.run_id}", file=sys.stderr)
        return 1
    found = run_artifacts(events)
    placed = None
    if args.out:
        try:
            placed = materialise(found, Path(args.out))
        except ArtifactIntegrityError as exc:
            print(f"cannot copy the artifacts out: {exc}", file=sys.stderr)
            return 1
    print(artifacts_text(args.run_id, found, placed))
    return 0


def artifacts_line(run_id: str, events: list[dict]) -> str | None:
    """The closing summary's pointer to the run's artifacts."""
    from services.cli.artifacts_cmd import run_artifacts

    found = run_artifacts(events)
    if not found:
        return None
    return (f"artifacts: {len(found)} ({', '.join(a.name for a in found)}); "
            f"`tuneline artifacts {run_id} --out DIR` copies them out under these names")


async def _rebuild(name: str = "timeline") -> tuple[int, bool, int | None]:
    """Rebuild a projection (the timeline, History) and compare it with the live one at the same position:
    under the checkpoint's row lock (the live projector waits), the live rows are read, then the rebuild
    replays run_events up to the live checkpoint only, so events recorded meanwhile cannot make it differ."""
    from services.audit.projections import history, timeline

    projection = {"timeline": timeline, "history": history}[name]
    conn = await _db(urls()[1])
    try:
        async with conn.transaction():
            position = await conn.fetchval(
                "SELECT position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE", projection.NAME)
            before = await projection.snapshot(conn)
            n = await projection.rebuild(conn, until=position)
            after = await projection.snapshot(conn)
        return n, before == after, position
    finally:
        await conn.close()


def cmd_rebuild(args) -> int:
    from services.audit.projections.timeline import ProjectionError

    try:
        n, same, position = asyncio.run(_rebuild(args.projection))
    except ProjectionError as exc:
        print(f"rebuild stopped: {exc} (nothing changed)", file=sys.stderr)
        return 1
    upto = "" if position is None else f" up to position {position}, the live projection's checkpoint"
    print(f"{args.projection} rebuilt from run_events{upto}: {n} events replayed; "
          f"{'identical to the live projection' if same else 'DIFFERS from the previous projection'}")
    return 0 if same else 1


def cmd_migrate(args) -> int:
    from services.audit.migrate import migrate

    report = asyncio.run(migrate(urls()[1]))
    print(f"applied {len(report.applied)}, already applied {len(report.skipped)}")
    return 0


def cmd_sample_data(args) -> int:
    from services.cli.sample_data import generate

    info = generate(Path(args.path), rows_per_label=args.rows_per_label)
    print(f"wrote {info['rows']} rows ({', '.join(info['labels'])}, plus 3 malformed) to {info['path']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start nats-server, PostgreSQL (unless NATS_URL/DATABASE_URL) and every service")
    up.add_argument("--replicas", default=None, metavar="SERVICE=N,...",
                    help="instances of a stage service, competing for its messages, e.g. trainer=2,evaluator=2 "
                         "(remembered by later `up`s; SERVICE=1 goes back to one)")
    up.add_argument("--standby", action=argparse.BooleanOptionalAction, default=None,
                    help="also start a standby audit process that takes over recording when the active one dies "
                         "(remembered by later `up`s; --no-standby stops it)")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(fn=cmd_down)
    s = sub.add_parser("status", help="services, stream, recorder lag, projection")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    r = sub.add_parser("run", help="start a run and follow it to the end")
    r.add_argument("--locator", required=True, help="where the labelled rows are, e.g. jsonl:data.jsonl")
    r.add_argument("--target", required=True, help="the deployment target the version is registered for")
    r.add_argument("--text-field", default=None, help="the text field (no mapping at all: introspection proposes one)")
    r.add_argument("--label-field", default=None)
    r.add_argument("--map", action="append", help=ingest_cmds.MAP_HELP)
    r.add_argument("--force", action="store_true", help="accept an introspected mapping below 0.80 confidence")
    r.add_argument("--eval-locator", default=None, help="an explicit eval dataset instead of a split")
    r.add_argument("--recipe", default=None, help="a named recipe (`tuneline recipes`); default: the dataset shape's")
    r.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a recipe field (--set epochs=3) or a cleaning knob (--set clean.near_dup=false, "
                        "--set clean.length_outliers=off)")
    r.add_argument("--min-per-class", type=int, default=None, metavar="N",
                   help="drop labels with fewer than N rows after cleaning (counted as cleaning.rare_label) instead "
                        "of failing the run; a label the target's test set holds is kept")
    r.add_argument("--backend", choices=("local", "openai", "anthropic"), default="local")
    r.add_argument("--hosted-model", default="gpt-4o-mini-2024-07-18", help="hosted backends: the base model")
    r.add_argument("--hosted-base-url", default=None, help="an OpenAI-compatible fine-tuning host")
    r.add_argument("--api-key-env", default="OPENAI_API_KEY", help="the environment variable holding the API key")
    r.add_argument("--preflight", choices=("strict", "fail_open"), default="strict")
    r.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (default: the recipe's epochs)")
    r.add_argument("--eval-fraction", type=float, default=0.2,
                   help="the test share, when this run makes the target's test set (its first run, --new-test-set)")
    r.add_argument("--validation-fraction", type=float, default=0.1,
                   help="the share of the non-test rows the trainer validates on (0: none)")
    r.add_argument("--evaluation", default=None, metavar="FILE",
                   help="a YAML or JSON file: the judge (rubric weights or an LLM), the gate policy (buckets, safety "
                        "buckets, margins) and a prompt baseline")
    r.add_argument("--new-test-set", action="store_true",
                   help="freeze a new test set for the target instead of reusing the one in force (recorded)")
    r.add_argument("--seed", type=int, default=13)
    r.add_argument("--tune", type=int, default=None, metavar="N",
                   help="search the recipe's settings first: up to N trials, each trained on the train split and "
                        "scored on the validation split (never the test set); the final model gets the best settings")
    r.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="with --tune: the time the trials may take (default 30); a trial starts only when the time "
                        "the trials so far took says it fits")
    r.add_argument("--tune-space", action="append", metavar="FIELD=[V1,V2,...]",
                   help="with --tune: the candidates of a recipe field (JSON list), e.g. learning_rate=[5e-4,1e-3]; "
                        "the fields given are the whole search space (default: the recipe's)")
    r.add_argument("--base-model", default=None, help="local path or hub id (default: bundled all-MiniLM-L6-v2)")
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("--no-wait", action="store_true")
    r.set_defaults(fn=cmd_run)
    ingest_cmds.add_parser(sub, sys.modules[__name__])
    import_cmds.add_parser(sub, sys.modules[__name__])
    eval_cmds.add_parser(sub, sys.modules[__name__])
    registry_cmds.add_parser(sub, sys.modules[__name__])
    token_cmds.add_parser(sub, sys.modules[__name__])
    history_cmds.add_parser(sub, sys.modules[__name__])
    audit_cmds.add_parser(sub, sys.modules[__name__])
    from services.cli import bundle_cmd
    bundle_cmd.add_parser(sub, sys.modules[__name__])
    from services.cli import export_cmds
    export_cmds.add_parser(sub, sys.modules[__name__])
    follow.add_parser(sub, sys.modules[__name__])
    tr = sub.add_parser("train", help="cancel, pause or resume a run's training")
    tr.add_argument("action", choices=("cancel", "pause", "resume"))
    tr.add_argument("run_id")
    tr.add_argument("--reason", default=None)
    tr.set_defaults(fn=cmd_train_control)
    rc = sub.add_parser("recipes", help="the named training recipes and their defaults")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(fn=cmd_recipes)
    t = sub.add_parser("timeline", help="a run's timeline, from the projection")
    t.add_argument("run_id")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_timeline)
    e = sub.add_parser("events", help="a run's events, from run_events")
    e.add_argument("--run", required=True)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_events)
    ar = sub.add_parser("artifacts", help="a run's artifacts under readable names; --out copies them to a folder")
    ar.add_argument("run_id")
    ar.add_argument("--out", default=None, metavar="DIR", help="copy them here (directories for adapters and exports)")
    ar.set_defaults(fn=cmd_artifacts)
    rb = sub.add_parser("rebuild", help="drop a projection and rebuild it from run_events")
    rb.add_argument("projection", choices=["timeline", "history"])
    rb.set_defaults(fn=cmd_rebuild)
    sub.add_parser("migrate", help="apply infra/postgres/*.sql").set_defaults(fn=cmd_migrate)
    sd = sub.add_parser("sample-data", help="write the generated demo dataset")
    sd.add_argument("path")
    sd.add_argument("--rows-per-label", type=int, default=100)
    sd.set_defaults(fn=cmd_sample_data)
    return p


def entry() -> None:
    """The `tuneline` command. Its own log events (stream declarations, ...) are JSON on stderr like
    every service's, warnings and up unless TUNELINE_LOG_LEVEL says otherwise: its output is what it
    prints. (main() leaves logging as it finds it, for callers in-process.)"""
    configure_logging("cli", os.environ.get("TUNELINE_LOG_LEVEL", "WARNING"))
    try:
        main()
    except BrokenPipeError:
        # whoever read the output stopped (`tuneline events --run RUN | head`): not an error to report;
        # stdout goes to /dev/null so that the interpreter's last flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    global nats_user
    args = parser().parse_args(argv)
    nats_user = "admin" if args.command in OPERATOR_COMMANDS else "cli"
    try:
        rc = args.fn(args)
    except StackUnreachable as exc:
        print(exc, file=sys.stderr)
        rc = 1
    sys.exit(rc)


if __name__ == "__main__":
    entry()
